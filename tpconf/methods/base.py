"""The protocol every method implements, and what the reconciler hands a method at run time.

A *method* is how a deployment's local process reaches the cluster. One module per method
(:mod:`~tpconf.methods.inject_tcp`, :mod:`~tpconf.methods.vpn_tcp`) implements :class:`Method`:

- for the file: its name, a one-line ``summary`` (the reference documents it from there) and
  ``check``, its rules and warnings across the deployments that use it;
- for ``tpconf plan``: ``describe``, what it will set up for one deployment, in words;
- for the planner: ``outbound_facet``, what its outbound side depends on besides the method
  itself (a change of it is applied with :meth:`Outbound.update`, in place);
- for ``tpconf up``: ``runtime``, its state for one session (vpn-tcp shares one VPN between the
  session's deployments), whose ``outbound`` runs a deployment's network side as a unit and hands
  back an :class:`Outbound`: what the status shows of it, and what it adds to a local process
  (:class:`Launch`).

docs/architecture.md, "Adding a method", walks through the steps.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Hashable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from anyio.abc import TaskGroup, TaskStatus

from tpconf.config import DeploymentSpec, MethodRules, Project

if TYPE_CHECKING:
    from tpconf.cluster import ClusterNetworks
    from tpconf.net import Dialer
    from tpconf.proxy import ClusterResolver

Notice = Callable[[str], None]
"""A progress line for one deployment (``up`` prints it as ``name | text``)."""


@dataclass(frozen=True)
class LaunchRequest:
    """What a local process of the deployment is to see: what a method that runs the process
    somewhere else (a container) must hand it itself."""

    spec: DeploymentSpec
    pod_env: Mapping[str, str]
    """The pod's side of the environment: its variables, ``TELEPRESENCE_*``, `env.set`."""
    root: Path | None
    """Where the pod's filesystem is mounted here (``None``: `volumes: false`)."""
    mounts: tuple[str, ...]
    """The pod's mount points."""
    withheld: Mapping[str, str] = field(default_factory=dict)
    """The pod's variables left out of :attr:`pod_env` because they change how programs on this
    machine start (``LD_PRELOAD``, ``NODE_OPTIONS``, ...): a method that runs the process in
    the pod's own image hands them over too."""


@dataclass(frozen=True)
class Launch:
    """What a method adds to a local process it runs: a command prefix and variables."""

    prefix: tuple[str, ...] = ()
    """Put in front of the command (for example ``("/usr/bin/torsocks",)``)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Added to the process environment (over the pod's)."""
    contained: bool = False
    """The prefix starts a container that the method gives the pod's environment and volumes:
    the command it is given runs with tpconf's own environment plus :attr:`env`, without
    proot, and runs without a `run` too (the image's own command)."""
    prepare: Callable[[], Awaitable[None]] | None = None
    """Awaited before the command starts; raises a :class:`~tpconf.errors.TpconfError` that
    says what is missing (the container method checks the image is there)."""
    cleanup: Callable[[], Awaitable[None]] | None = None
    """Awaited, shielded, once the command is stopped for good (what a killed prefix left)."""
    death_signal: signal.Signals = signal.SIGKILL
    """What the kernel sends the command when tpconf dies: SIGTERM for a prefix that passes
    it on before it ends (``docker run``)."""


@dataclass(frozen=True)
class Link:
    """What a method's outbound side gets: the deployment, and its earlier units' results."""

    spec: DeploymentSpec
    project: Project
    dialer: Dialer
    """Opens TCP connections from the proxy pod (the deployment's tunnel)."""
    resolver: ClusterResolver
    """Names as the pod resolves them, through the tunnel."""
    discover_networks: Callable[[], Awaitable[ClusterNetworks]]
    """The cluster's pod and Service networks and its API server address (for routes)."""
    notice: Notice
    delivered_ports: Callable[[DeploymentSpec], frozenset[int]] = lambda spec: frozenset()
    """The local ports the cluster sends connections to for ``spec`` (`expose`, `from-pod`, a
    swapped container's ports, an intercept's routes): where a method that runs the process
    elsewhere must listen for it."""

    @property
    def name(self) -> str:
        """The deployment's name in the file."""
        return self.spec.name


class Outbound(Protocol):
    """A deployment's running network side, as a method set it up."""

    def status(self) -> str:
        """One line for ``tpconf status`` (for example the SOCKS port, or the routed ranges)."""

    async def update(self, spec: DeploymentSpec, project: Project) -> None:
        """Apply a change of the method's :meth:`Method.outbound_facet` without a restart."""

    def launch(self, request: LaunchRequest) -> AbstractContextManager[Launch]:
        """Set up what a local process needs, for as long as it runs (``with`` it)."""


class MethodRuntime(Protocol):
    """A method's state for one ``tpconf up``."""

    async def outbound(self, link: Link, *, task_status: TaskStatus[Outbound]) -> None:
        """Set up the deployment's network side, report it with ``task_status.started``, keep
        it until cancelled, then undo it (shielded)."""


@dataclass(frozen=True)
class Services:
    """What a session lends its methods' runtimes."""

    task_group: TaskGroup
    """The session's root task group, for what outlives one deployment (the shared VPN)."""
    notice: Callable[[str, str], None]
    """A progress line: ``notice(deployment, text)``."""
    session_id: str = ""
    """The session's id (what a method labels the local things it starts with)."""
    project_id: str = ""
    """The project's id (a hash of its directory), likewise."""


class Method(MethodRules, Protocol):
    """One method: a module of :mod:`tpconf.methods`, registered in ``REGISTRY``.

    ``name``, ``summary`` and ``check`` are what the file format needs
    (:class:`~tpconf.config.MethodRules`); the rest is for the planner and ``up``.
    """

    def describe(self, spec: DeploymentSpec) -> list[str]:
        """What ``up`` sets up for it, one ``+ ...`` line each, for ``tpconf plan``."""

    def outbound_facet(self, spec: DeploymentSpec, project: Project) -> Hashable:
        """What its outbound side depends on besides the method's name (``()`` if nothing)."""

    def runtime(self, services: Services) -> MethodRuntime:
        """Its state for one session."""
