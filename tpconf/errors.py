"""The user-facing error tree. Every layer raises these; only the CLI renders them.

::

    TpconfError(message, hint)
    ├── ConfigError            a telepresence.yaml problem, with file:line:column and key
    │   └── ConfigErrors       several ConfigErrors found in one read of the file
    ├── ClusterError           the Kubernetes API refused or failed
    │   ├── ClusterUnreachable
    │   ├── Forbidden          RBAC: names the verb and resource that is missing
    │   ├── NotFound
    │   ├── AlreadySwapped     a second swap of a swapped Deployment
    │   ├── PodFailed          image pull, unschedulable, crash
    │   └── WaitTimeout
    ├── TunnelError            port-forward or SSH to the agent
    │   ├── HostKeyMismatch
    │   └── ForwardFailed      a remote forward for `expose` could not bind
    ├── ProxyError             local SOCKS/DNS listeners
    ├── ProcessError           the local command
    ├── PrivilegeError         needs root / CAP_NET_ADMIN / FUSE
    └── NotImplementedYet      a command whose issue has not landed

Error classes say whether retrying can help through ``Transient``: the reconciler backs off and
retries those; anything else fails only its own unit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: Remote payloads are cut to this length before they reach a message: the leading part is what
#: explains an error, and the tail is where tokens and other secrets tend to be.
PAYLOAD_MAX = 256


def trim_payload(text: str) -> str:
    """Cut a remote error payload to :data:`PAYLOAD_MAX` characters."""
    text = text.strip()
    return text if len(text) <= PAYLOAD_MAX else text[:PAYLOAD_MAX] + "…"


class TpconfError(Exception):
    """Base of every error a user may see."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """The message and the hint, as the CLI prints them."""
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class Transient:
    """Mixin: retrying after ``delay`` seconds can help (network drop, pod restarting)."""

    delay: float = 1.0


@dataclass(frozen=True)
class Position:
    """Where in a file a problem is. Lines and columns count from 1."""

    file: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.file
        if self.column is None:
            return f"{self.file}:{self.line}"
        return f"{self.file}:{self.line}:{self.column}"


class ConfigError(TpconfError):
    """Raised when telepresence.yaml cannot be read or does not validate."""

    def __init__(
        self,
        message: str,
        *,
        position: Position,
        loc: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.position = position
        self.loc = loc

    def __str__(self) -> str:
        where = f"{self.position}: {self.loc}: " if self.loc else f"{self.position}: "
        return where + self.message

    def render(self) -> str:
        return str(self) if not self.hint else f"{self}\n  hint: {self.hint}"


class ConfigErrors(ConfigError):
    """Raised when one read of the file finds several problems; all are reported at once."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors = sorted(
            errors,
            key=lambda e: (e.position.file, e.position.line or 0, e.position.column or 0, e.loc),
        )
        if not self.errors:
            raise ValueError("ConfigErrors needs at least one error")
        first = self.errors[0]
        super().__init__(first.message, position=first.position, loc=first.loc, hint=first.hint)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)

    def render(self) -> str:
        return "\n".join(e.render() for e in self.errors)


class ClusterError(TpconfError):
    """Raised when the Kubernetes API refuses or fails a request."""


class ClusterUnreachable(Transient, ClusterError):
    """Raised when the API server cannot be reached."""


class Forbidden(ClusterError):
    """Raised when RBAC denies a request; the message names the verb and resource."""


class NotFound(ClusterError):
    """Raised when a named Deployment, Pod or Secret does not exist."""


class AlreadySwapped(ClusterError):
    """Raised when a Deployment is already swapped by someone (maybe us, before a crash)."""


class PodFailed(ClusterError):
    """Raised when the proxy pod cannot start: image pull, scheduling, crash."""


class WaitTimeout(ClusterError):
    """Raised when something we wait for does not happen in time; says what it was."""


class TunnelError(TpconfError):
    """Raised when the port-forward or the SSH connection to the agent fails."""


class TunnelDown(Transient, TunnelError):
    """Raised when an established tunnel drops; reconnecting can help."""


class HostKeyMismatch(TunnelError):
    """Raised when the agent presents a host key other than the one tpconf generated for it."""


class ForwardFailed(TunnelError):
    """Raised when a remote forward for an `expose` port cannot be opened in the pod."""


class ProxyError(TpconfError):
    """Raised when a local SOCKS or DNS listener cannot start or serve."""


class ProcessError(TpconfError):
    """Raised when a local command cannot start."""


class PrivilegeError(TpconfError):
    """Raised when an operation needs root, CAP_NET_ADMIN or FUSE and does not have it."""


class NotImplementedYet(TpconfError):
    """Raised by commands whose implementation has not landed yet."""
