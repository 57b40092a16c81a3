"""A supervised tunnel: reconnects by itself, and says so.

``await tg.start(run_tunnel, transport, credentials)`` returns a :class:`SupervisedTunnel` once
the first SSH connection is up (startup errors reach the caller). Then :func:`run_tunnel` keeps
it up until cancelled:

- when the connection drops (pod deleted, port-forward died, keepalives unanswered) it calls
  ``transport()`` again and reconnects, waiting 0.2 s, 0.4 s, … up to 5 s between attempts;
- every state change is passed to ``on_state`` as a :class:`TunnelEvent`
  (connecting → connected → reconnecting(reason) → connected …, or failed);
- :meth:`SupervisedTunnel.dial` during a reconnection waits (``settings.dial_wait``) for the new
  connection instead of failing at once;
- remote forwards made through :meth:`SupervisedTunnel.forward_remote` are made again on each new
  connection.

Errors that retrying cannot fix (a host key mismatch, our key refused, RBAC) end it: state
``failed``, and the error is raised out of :func:`run_tunnel`.

The transport is pluggable: any callable returning an async context manager that yields an
:data:`~tpconf.tunnel.connection.Endpoint` and keeps it usable until exit. Production passes
:func:`tpconf.tunnel.portforward.port_forward_transport`; tests pass a local server's address.
The transport is called again for every attempt, so it should find the *current* proxy pod
(a re-created pod has a new name).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteStream, TaskStatus

from tpconf.errors import TpconfError, Transient, TunnelDown, TunnelError
from tpconf.tunnel.settings import (
    DEFAULT_SETTINGS,
    CommandResult,
    Credentials,
    Endpoint,
    TunnelSettings,
)

if TYPE_CHECKING:
    from tpconf.tunnel.connection import RemoteForward, Tunnel

log = logging.getLogger(__name__)

Transport = Callable[[], AbstractAsyncContextManager[Endpoint]]
"""Opens a way to the agent's sshd for one connection attempt (e.g. a ``kubectl port-forward``)."""


class TunnelState(enum.Enum):
    """Where a supervised tunnel is."""

    CONNECTING = "connecting"
    """The first connection is being made."""
    CONNECTED = "connected"
    """Connected: dial, forwards and commands work."""
    RECONNECTING = "reconnecting"
    """The connection dropped or an attempt failed; the next attempt comes after a back-off."""
    FAILED = "failed"
    """Gave up: retrying cannot help (see the reason); :func:`run_tunnel` raises."""


@dataclass(frozen=True)
class TunnelEvent:
    """One state change, as passed to ``on_state``."""

    state: TunnelState
    reason: str | None = None
    """Why we are reconnecting or failed (the error message)."""
    attempt: int = 0
    """Attempts made since the last time the tunnel was connected."""
    where: str | None = None
    """Where we connected, for ``connected``."""


class SupervisedForward:
    """A remote forward kept across reconnections. :meth:`close` ends it for good."""

    def __init__(
        self,
        owner: SupervisedTunnel,
        *,
        remote_port: int,
        local_port: int,
        local_host: str,
        bind_host: str,
    ) -> None:
        self._owner = owner
        self.remote_port = remote_port
        self.local_port = local_port
        self.local_host = local_host
        self.bind_host = bind_host
        self.current: RemoteForward | None = None
        self.error: TunnelError | None = None
        """Why the forward could not be made again after the last reconnection, if it could not."""

    @property
    def port(self) -> int:
        """The port the agent listens on now (differs from ``remote_port`` only when that is 0)."""
        return self.current.port if self.current is not None else self.remote_port

    async def _open(self, tunnel: Tunnel) -> None:
        self.current = await tunnel.forward_remote(
            self.remote_port, self.local_port, local_host=self.local_host, bind_host=self.bind_host
        )
        self.error = None

    def close(self) -> None:
        """Stop forwarding, now and after any reconnection."""
        self._owner._forwards.discard(self)
        if self.current is not None:
            self.current.close()
            self.current = None


class SupervisedTunnel:
    """The handle :func:`run_tunnel` gives out. Implements :class:`tpconf.net.Dialer`."""

    def __init__(self, settings: TunnelSettings) -> None:
        self._settings = settings
        self._current: Tunnel | None = None
        self._connected = anyio.Event()
        self._failed: TpconfError | None = None
        self._forwards: set[SupervisedForward] = set()
        self.state = TunnelState.CONNECTING

    @property
    def current(self) -> Tunnel | None:
        """The live connection, or None while (re)connecting."""
        return self._current

    async def wait_connected(self, timeout: float | None = None) -> Tunnel:
        """The live connection; waits up to ``timeout`` (``settings.dial_wait``) for one."""
        limit = self._settings.dial_wait if timeout is None else timeout
        with anyio.move_on_after(limit):
            while True:
                if self._failed is not None:
                    raise self._failed
                current = self._current
                if current is not None and not current.closed:
                    return current
                if self._connected.is_set():
                    await anyio.sleep(0.005)  # it just dropped; run_tunnel is about to notice
                else:
                    await self._connected.wait()
        raise TunnelDown(
            f"the tunnel to the agent is {self.state.value} and did not come back within"
            f" {limit:g} s",
            hint="tpconf keeps retrying; check the proxy pod with `kubectl get pods`",
        )

    async def dial(self, host: str, port: int) -> ByteStream:
        """Open a TCP connection from the pod; waits for a reconnection if one is under way."""
        tunnel = await self.wait_connected()
        try:
            return await tunnel.dial(host, port)
        except TunnelDown:
            if not tunnel.closed:
                raise
        return await (await self.wait_connected()).dial(host, port)  # the drop just happened

    async def dial_early(self, host: str, port: int) -> ByteStream:
        """:meth:`Tunnel.dial_early` on the live connection (waits for a reconnection)."""
        return await (await self.wait_connected()).dial_early(host, port)

    async def forward_remote(
        self,
        remote_port: int,
        local_port: int,
        *,
        local_host: str = "127.0.0.1",
        bind_host: str = "0.0.0.0",
    ) -> SupervisedForward:
        """Like :meth:`Tunnel.forward_remote`, and made again after each reconnection.

        Raises :class:`~tpconf.errors.ForwardFailed` if it cannot be made now.
        """
        forward = SupervisedForward(
            self,
            remote_port=remote_port,
            local_port=local_port,
            local_host=local_host,
            bind_host=bind_host,
        )
        await forward._open(await self.wait_connected())
        self._forwards.add(forward)
        return forward

    async def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        """Run a command on the agent (see :meth:`Tunnel.run`)."""
        return await (await self.wait_connected()).run(command, timeout=timeout)

    async def relay_ready(self) -> bool:
        """Wait until the live connection's relay is up (or failed to start); whether it is."""
        return await (await self.wait_connected()).relay_ready() is not None

    async def open_sftp_stream(self) -> ByteStream:
        """Start ``sftp`` on the agent (see :meth:`Tunnel.open_sftp_stream`); not re-made on reconnection."""
        return await (await self.wait_connected()).open_sftp_stream()

    async def _restore_forwards(self, tunnel: Tunnel) -> None:
        for forward in list(self._forwards):
            try:
                await forward._open(tunnel)
            except TunnelDown:
                raise
            except TunnelError as exc:
                forward.current, forward.error = None, exc
                log.warning("after reconnecting, %s", exc.message)

    def _set_connected(self, tunnel: Tunnel | None) -> None:
        self._current = tunnel
        if tunnel is not None:
            self._connected.set()
            return
        if self._connected.is_set():
            self._connected = anyio.Event()
        for forward in self._forwards:
            forward.current = None  # its listener went with the connection

    def _fail(self, exc: TpconfError) -> None:
        self._failed = exc
        self._connected.set()  # wake waiters, who raise


async def run_tunnel(
    transport: Transport,
    credentials: Credentials,
    *,
    settings: TunnelSettings = DEFAULT_SETTINGS,
    on_state: Callable[[TunnelEvent], None] | None = None,
    task_status: TaskStatus[SupervisedTunnel] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Keep a tunnel to the agent up until cancelled; ``task_status.started`` once first connected.

    ``on_state`` is called synchronously on every state change; to get a stream instead, pass
    the ``send_nowait`` of a memory object stream with enough buffer.
    """
    # The SSH library loads here, with the first connection (not when ``up`` starts).
    from tpconf.tunnel.connection import open_tunnel

    tunnel = SupervisedTunnel(settings)
    attempt = 0
    delay = settings.backoff_initial
    started = False

    def emit(event: TunnelEvent) -> None:
        tunnel.state = event.state
        log.info(
            "tunnel %s%s",
            event.state.value,
            f": {event.reason}" if event.reason is not None else "",
        )
        if on_state is not None:
            on_state(event)

    emit(TunnelEvent(TunnelState.CONNECTING))
    deadline = anyio.current_time() + settings.first_connect_timeout
    while True:
        attempt += 1
        reason: str
        try:
            async with (
                transport() as endpoint,
                open_tunnel(endpoint, credentials, settings=settings) as live,
            ):
                await tunnel._restore_forwards(live)
                tunnel._set_connected(live)
                attempt, delay = 0, settings.backoff_initial
                emit(TunnelEvent(TunnelState.CONNECTED, where=live.where))
                if not started:
                    started = True
                    task_status.started(tunnel)
                try:
                    reason = await live.wait_closed()
                finally:
                    tunnel._set_connected(None)
        except TpconfError as exc:
            if not isinstance(exc, Transient):
                emit(TunnelEvent(TunnelState.FAILED, reason=exc.message, attempt=attempt))
                tunnel._fail(exc)
                raise
            reason = exc.message
        except OSError as exc:  # from a transport that does not translate its own errors
            reason = str(exc) or type(exc).__name__
        if not started and anyio.current_time() + delay > deadline:
            error = TunnelDown(
                f"could not connect to the agent within {settings.first_connect_timeout:g} s:"
                f" {reason}",
                hint="check the proxy pod with `kubectl get pods` and `kubectl logs`",
            )
            emit(TunnelEvent(TunnelState.FAILED, reason=error.message, attempt=attempt))
            tunnel._fail(error)
            raise error
        emit(TunnelEvent(TunnelState.RECONNECTING, reason=reason, attempt=attempt))
        await anyio.sleep(delay)
        delay = min(delay * 2, settings.backoff_max)
