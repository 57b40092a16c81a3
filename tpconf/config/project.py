"""The resolved configuration: what the rest of tpconf uses.

A :class:`Project` is built from a valid telepresence.yaml with every default applied, every
shorthand expanded and every local path made absolute. All classes are frozen dataclasses, so two
:class:`DeploymentSpec` compare equal exactly when nothing that matters changed: the reconcile
planner restarts a deployment when its spec differs from the running one.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from tpconf.config.values import AlsoProxyTarget
from tpconf.errors import ConfigError, Position

ExportFormat = Literal["dotenv", "json"]

#: When a deployment's command is started again after it exits (docker compose's `restart`).
RestartPolicy = Literal["no", "on-failure", "always"]


@dataclass(frozen=True, slots=True)
class PortMapping:
    """An exposed port: connections to ``remote`` in the pod reach ``local`` on this machine."""

    local: int
    remote: int

    def __str__(self) -> str:
        return str(self.local) if self.local == self.remote else f"{self.local}:{self.remote}"


@dataclass(frozen=True, slots=True)
class NewOp:
    """Create a Deployment and a Service called ``name`` (``None``: the entry's name), running
    ``image``."""

    image: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class SwapOp:
    """Swap the Deployment ``deployment`` (its container ``container``, or the only one)."""

    deployment: str
    container: str | None = None


@dataclass(frozen=True, slots=True)
class ExistingOp:
    """Use the Deployment ``deployment``, which already runs the proxy."""

    deployment: str


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A header that selects requests: ``name`` (lowercase) equal to ``value``, or matching it
    as a regular expression (the whole value)."""

    name: str
    value: str
    regex: bool = False


@dataclass(frozen=True, slots=True)
class InterceptOp:
    """Add the agent to Deployment ``deployment``'s pods as a sidecar; ``ports`` map container
    ports (``remote``) to local ones; with ``headers``, only matching HTTP requests come here.
    ``ports`` empty means every TCP port the container declares, each to the same local port."""

    deployment: str
    container: str | None = None
    ports: tuple[PortMapping, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()

    @property
    def sidecar(self) -> tuple[str, str | None, tuple[int, ...]]:
        """What the pods depend on: the headers and local ports are routes, changed in place."""
        return (self.deployment, self.container, tuple(m.remote for m in self.ports))


Operation = NewOp | SwapOp | ExistingOp | InterceptOp


@dataclass(frozen=True, slots=True)
class Mount:
    """The pod path ``pod`` available at the absolute local path ``local``."""

    pod: str
    local: Path
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class VolumesSpec:
    """Where the pod's filesystem appears: ``root`` (absolute) plus extra ``mounts``."""

    root: Path
    mounts: tuple[Mount, ...] = ()
    real_paths: bool = False


@dataclass(frozen=True, slots=True)
class EnvExport:
    """The environment is written to ``file`` (absolute) in ``format``."""

    file: Path
    format: ExportFormat


@dataclass(frozen=True, slots=True)
class EnvSpec:
    """Changes to the process's environment: ``set`` (sorted ``(name, value)`` pairs) on top of
    the pod's environment, and the optional ``export`` file."""

    set: tuple[tuple[str, str], ...] = ()
    export: EnvExport | None = None

    def as_dict(self) -> dict[str, str]:
        """``set`` as a new dict."""
        return dict(self.set)


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One deployment, fully resolved.

    ``run`` is an argv tuple, a shell command string (run with ``sh -c``), or ``None`` for no
    process (``shell`` may then be true: an interactive shell). ``context`` ``None`` means the
    kubeconfig's current context, ``namespace`` ``None`` the context's namespace.
    ``agent_image`` is the proxy image (for a ``new`` deployment, ``NewOp.image``).
    """

    name: str
    operation: Operation
    method: str
    """A name of the method registry (:mod:`tpconf.methods`), checked by the loader."""
    expose: tuple[PortMapping, ...]
    also_proxy: tuple[AlsoProxyTarget, ...]
    volumes: VolumesSpec | None
    env: EnvSpec
    run: tuple[str, ...] | str | None
    shell: bool
    namespace: str | None
    context: str | None
    agent_image: str
    to_pod: tuple[int, ...] = ()
    """Ports of the pod's localhost reachable here."""
    from_pod: tuple[int, ...] = ()
    """Ports of this machine reachable on the pod's localhost."""
    restart: RestartPolicy = "no"
    """When ``run`` is started again after it exits."""
    profiles: tuple[str, ...] = ()
    """Started only when one of these is active or the deployment is named; empty: always."""
    image: str | None = None
    """The image the process runs in (a method that runs containers)."""
    container_args: tuple[str, ...] = ()
    """More ``docker run`` options for that container."""

    @property
    def target(self) -> str:
        """The Kubernetes Deployment this entry creates or works on."""
        op = self.operation
        return (op.name or self.name) if isinstance(op, NewOp) else op.deployment


@dataclass(frozen=True, slots=True)
class VpnSpec:
    """Networks the VPN routes; empty means "discover them in the cluster"."""

    pod_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    service_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """A setting that is valid but probably not what the user wants, with its position."""

    message: str
    position: Position
    loc: str = ""
    hint: str | None = None

    def __str__(self) -> str:
        where = f"{self.position}: warning: "
        return where + (f"{self.loc}: {self.message}" if self.loc else self.message)

    def render(self) -> str:
        """The warning and its hint, as the CLI prints them."""
        return str(self) if not self.hint else f"{self}\n  hint: {self.hint}"


@dataclass(frozen=True, slots=True)
class Project:
    """A loaded telepresence.yaml: its deployments in file order, and its warnings."""

    source_path: Path
    base_dir: Path
    context: str | None
    namespace: str | None
    vpn: VpnSpec
    deployments: tuple[DeploymentSpec, ...]
    warnings: tuple[ConfigWarning, ...] = ()
    allowed_contexts: tuple[str, ...] | None = None
    """The contexts tpconf may change (``None``: any)."""
    display: str = "telepresence.yaml"
    """The main file as messages name it."""

    def deployment(self, name: str) -> DeploymentSpec:
        """The deployment called ``name``; raises :class:`KeyError`."""
        for spec in self.deployments:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        """The deployments' names, in file order."""
        return tuple(spec.name for spec in self.deployments)

    def selected(self, names: Sequence[str] = (), profiles: Collection[str] = ()) -> Project:
        """The project with only the deployments a command works on, as docker compose picks
        services: the ``names`` given, else every deployment without `profiles` and those with
        an active profile. A name that is not in the file is a :class:`ConfigError`; a profile
        that no deployment has is a warning (a typo starts less than expected)."""
        known = self.names
        unknown = [name for name in names if name not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.6)
            listing = ", ".join(known) or "none"
            raise ConfigError(
                f"no deployment `{unknown[0]}` in the file (deployments: {listing})",
                position=Position(self.display),
                hint=f"did you mean `{close[0]}`?" if close else "name deployments of the file",
            )
        seen = {p for spec in self.deployments for p in spec.profiles}
        warnings = list(self.warnings) + [
            ConfigWarning(
                f"no deployment has profile `{profile}`",
                Position(self.display),
                hint="profiles in the file: " + (", ".join(sorted(seen)) or "none"),
            )
            for profile in sorted(set(profiles) - seen)
        ]
        if names:
            chosen = tuple(s for s in self.deployments if s.name in names)
        else:
            active = set(profiles)
            chosen = tuple(
                s for s in self.deployments if not s.profiles or active & set(s.profiles)
            )
        return replace(self, deployments=chosen, warnings=tuple(warnings))
