"""The inputs and results of the cluster operations: plain frozen dataclasses.

The reconciler maps its config models onto these (``tpconf.cluster`` does not import
``tpconf.config`` models, and never sees the tunnel's key objects: keys arrive as strings).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class New:
    """Create a proxy Deployment and a Service of that name (Telepresence's ``--new-deployment``)."""


@dataclass(frozen=True)
class Swap:
    """Replace an existing Deployment's pods by a proxy; restore it afterwards.

    ``container`` is the container to replace; ``None`` means the only (or first) one.
    """

    deployment: str
    container: str | None = None


@dataclass(frozen=True)
class Existing:
    """Use a Deployment that already runs the agent image (mounting Secret ``<name>-tpconf-keys``,
    which outlives ``tpconf up``: see :mod:`tpconf.cluster.proxies`)."""

    deployment: str


@dataclass(frozen=True)
class Intercept:
    """Add the agent to Deployment ``deployment``'s pods as a sidecar in front of container
    ``container``'s ``ports`` (``()``: every TCP port it declares); the app keeps serving. Its
    Services point at the sidecar while anyone intercepts; the last to leave restores both."""

    deployment: str
    container: str | None = None
    ports: tuple[int, ...] = ()


Operation = New | Swap | Existing | Intercept


@dataclass(frozen=True)
class AgentKeys:
    """Key material for one agent, in OpenSSH text formats. Never logged, never in messages.

    ``host_private_key`` is the agent's host key (OpenSSH private key format);
    ``authorized_keys`` is the line(s) of the client's public key.
    """

    host_private_key: str = field(repr=False)
    authorized_keys: str = field(repr=False)


@dataclass(frozen=True)
class ProxyRequest:
    """One deployment of telepresence.yaml, as the cluster layer needs it.

    ``name`` is the config name (for ``new`` it is also the Deployment and Service name);
    ``owner`` is ``user@host`` and ``project`` the hash of the project path
    (:func:`tpconf.cluster.labels.project_id`): together they decide what ``tpconf down`` may touch.
    """

    name: str
    namespace: str
    operation: Operation
    agent_image: str
    session_id: str
    owner: str
    project: str
    keys: AgentKeys
    expose_remote_ports: tuple[int, ...] = ()
    start_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    """Unique per request: labels this start's agent pod (``tpconf.io/start``)."""
    shared_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    """``intercept``: every key of the agent (the tunnel's secret data), stored for all the
    developers of the Deployment if they have none yet. Never logged."""


@dataclass(frozen=True)
class Proxy:
    """Where the agent of one request runs; what :func:`~tpconf.cluster.wait_for_pod` waits for.

    ``selector`` is a label selector (``k=v,k2=v2``) matching the agent's pods only;
    ``container`` is the agent container's name; ``ports`` are the container ports of the pod
    template (a swapped workload's own ports, for auto-expose).
    """

    namespace: str
    deployment: str
    selector: str
    container: str
    ports: tuple[int, ...] = ()
    service: str | None = None
    swapped: str | None = None
    intercepted: tuple[tuple[int, int], ...] = ()
    """``intercept``: (container port, the agent's port in front of it) pairs."""
    workload: str | None = None
    """The container whose env and volumes the local process gets, when it is not the agent's
    own (``intercept``: the app container beside it); ``TELEPRESENCE_CONTAINER``."""
    shared_keys: Mapping[str, str] | None = field(default=None, repr=False)
    """``intercept``: the keys every developer of the Deployment uses (from its Secret)."""


@dataclass(frozen=True)
class PodRef:
    """A Ready agent pod: what the tunnel port-forwards to."""

    namespace: str
    pod: str
    container: str


@dataclass
class DownReport:
    """What :func:`~tpconf.cluster.down` did, one line per object, for the CLI to print."""

    restored: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    """Keys Secrets of ``existing`` Deployments: kept (the Deployments mount them), no longer
    held by this owner."""

    def lines(self) -> list[str]:
        """Human-readable lines; ``["nothing to clean up"]`` when nothing was left behind."""
        out = [f"restored {r}" for r in self.restored] + [f"deleted {d}" for d in self.deleted]
        out += [f"released {r} (kept: its Deployment mounts it)" for r in self.released]
        return out or ["nothing to clean up"]
