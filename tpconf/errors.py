"""The user-facing error tree, and the one function that explains any exception to a user.

Every layer raises these; :func:`explain` turns any exception (these, groups of them, or a bug)
into an :class:`Explanation` (message, hint), and every place that shows an error to a user (the
CLI, the reconciler's status, the control socket, the DNS server's log) goes through it.

::

    TpconfError(message, hint)
    ├── ConfigError              a telepresence.yaml problem, with file:line:column and key
    │   └── ConfigErrors         several ConfigErrors found in one read of the file
    ├── ClusterError             the Kubernetes API refused or failed
    │   ├── ClusterUnreachable*  the API server cannot be reached (or answered 5xx/429)
    │   ├── Forbidden            RBAC: names the verb and resource that is missing
    │   ├── NotFound
    │   ├── AlreadySwapped       a second swap of a swapped Deployment
    │   ├── PodFailed            image pull, unschedulable, crash
    │   │   ├── ImageNotReady*   the image is not where the cluster pulls it (yet)
    │   │   └── PodEvicted*      the pod was evicted or its node shut down
    │   ├── WaitTimeout
    │   └── Conflict             (tpconf.cluster.errors) AlreadyExists, or changed meanwhile
    ├── TunnelError              port-forward or SSH to the agent
    │   ├── TunnelDown*          an established tunnel dropped
    │   ├── HostKeyMismatch
    │   └── ForwardFailed        a remote forward for `expose` could not bind
    ├── ProxyError               local SOCKS/DNS listeners
    │   └── ResolveError         (tpconf.proxy.resolver) a name the cluster cannot resolve
    │       ├── NameNotFound, NoRecords, ServerFailure
    │       └── ResolveTimeout*
    ├── ProcessError             the local command
    ├── MountError               (tpconf.volumes.sshfs) sshfs could not mount or unmount
    ├── EngineError              (tpconf.engine) Docker missing or refusing; no image
    │   └── EngineNotRunning*    the engine does not answer
    └── PrivilegeError           needs root / CAP_NET_ADMIN / FUSE

    * also ``Transient``: retrying after ``delay`` seconds can help.

The reconciler retries a deployment whose start failed with a ``Transient`` error, with back-off
and without waiting for an edit of the file; anything else fails only its own deployment and
waits for the file to change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Remote payloads are cut to this length before they reach a message: the leading part is what
#: explains an error, and the tail is where tokens and other secrets tend to be.
PAYLOAD_MAX = 256


def trim_payload(text: str) -> str:
    """Cut a remote error payload to :data:`PAYLOAD_MAX` characters."""
    text = text.strip()
    return text if len(text) <= PAYLOAD_MAX else text[:PAYLOAD_MAX] + "…"


class TpconfError(Exception):
    """Base of every error a user may see: a message and, where one helps, a hint to fix it."""

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


class ImageNotReady(Transient, PodFailed):
    """Raised when the proxy's image cannot be pulled (yet): it may be on its way to the
    registry or into the node, so the start is retried."""

    delay = 5.0


class PodEvicted(Transient, PodFailed):
    """Raised when the proxy pod was evicted, preempted or stopped with its node: its
    Deployment makes another one."""

    delay = 2.0


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


class EngineError(TpconfError):
    """Raised when the local container engine (Docker) is missing, stopped or refuses, or an
    image the container method needs is not there."""


class MountError(TpconfError):
    """Raised when sshfs cannot mount a pod path, or a mount cannot be removed."""


#: What a user is told about an exception that is not one of ours.
BUG_MESSAGE = "this is a bug in tpconf, please report it"


@dataclass(frozen=True)
class Explanation:
    """An exception as a user sees it: what happened, and how to fix it."""

    message: str
    hint: str | None = None
    bug: bool = False
    """Not one of tpconf's errors: a bug. The CLI shows the traceback with ``--debug``."""
    transient: bool = False
    """Retrying can help (every error in it is :class:`Transient`)."""
    config: bool = False
    """A problem of the file (the CLI exits with its own code)."""

    def render(self) -> str:
        """The message and the hint (for a bug: that it is one) as plain text."""
        if self.bug:
            return f"{self.message}\n{BUG_MESSAGE}"
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    @property
    def headline(self) -> str:
        """The first line of the message (for one-line displays such as the status table)."""
        return self.message.splitlines()[0] if self.message else ""


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions of a (nested) exception group, flattened; ``exc`` itself otherwise."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def explain(exc: BaseException) -> Explanation:
    """Turn any exception into what a user is told. The only place that words a bug.

    Groups (from task groups) are unwrapped and their distinct explanations joined. An
    exception that is not a :class:`TpconfError` is a bug: it is logged with its traceback (at
    debug level) and named as one.
    """
    parts = [_explain_one(leaf) for leaf in leaves(exc)]
    if len(parts) == 1:
        return parts[0]
    unique = list(dict.fromkeys(parts))
    hints = [p.hint for p in unique if p.hint]
    return Explanation(
        message="; ".join(p.message for p in unique),
        hint="; ".join(dict.fromkeys(hints)) or None,
        bug=any(p.bug for p in unique),
        transient=all(p.transient for p in unique),
        config=all(p.config for p in unique),
    )


def _explain_one(exc: BaseException) -> Explanation:
    if isinstance(exc, ConfigError):
        # The position is part of a config error's message; ConfigErrors lists every error.
        return Explanation(
            message=exc.render() if isinstance(exc, ConfigErrors) else str(exc),
            hint=None if isinstance(exc, ConfigErrors) else exc.hint,
            config=True,
        )
    if isinstance(exc, TpconfError):
        return Explanation(exc.message, exc.hint, transient=isinstance(exc, Transient))
    log.debug("unexpected error", exc_info=exc)
    text = str(exc)
    name = type(exc).__name__
    return Explanation(f"{name}: {text}" if text else name, bug=True)


def retry_delay(exc: BaseException, attempt: int, *, ceiling: float = 30.0) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...) after ``exc``: its ``delay``,
    doubled per attempt, at most ``ceiling``."""
    base = max((getattr(leaf, "delay", 1.0) for leaf in leaves(exc)), default=1.0)
    return float(min(ceiling, base * 2 ** max(0, attempt - 1)))
