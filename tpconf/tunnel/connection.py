"""One SSH connection to one agent, multiplexed (docs/architecture.md, "How one connection flows").

:func:`open_tunnel` logs in with the proxy's client key, accepts only the pinned host key, and
yields a :class:`Tunnel`:

- :meth:`Tunnel.dial` opens one ``direct-tcpip`` channel per outbound connection (it is a
  :class:`tpconf.net.Dialer`);
- :meth:`Tunnel.forward_remote` makes the agent listen on a pod port and deliver each
  connection to a local TCP server (``expose``);
- :meth:`Tunnel.run` runs a command on the agent (pod info);
- :meth:`Tunnel.open_sftp_stream` starts the ``sftp`` subsystem, whose byte stream feeds
  ``sshfs -o passive`` so volumes share this connection.

asyncssh and ``OSError`` exceptions are translated here, and only here, into the
:mod:`tpconf.errors` tree.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import asyncssh
from anyio.abc import ByteStream

from tpconf.errors import ForwardFailed, HostKeyMismatch, TunnelDown, TunnelError
from tpconf.tunnel.coalesce import CoalescingConnector
from tpconf.tunnel.mux import MuxChannel, MuxSession, new_key
from tpconf.tunnel.settings import (
    AGENT_SSH_PORT,
    CIPHERS,
    DEFAULT_SETTINGS,
    RELAY_COMMAND,
    CommandResult,
    Credentials,
    Endpoint,
    TunnelSettings,
)
from tpconf.tunnel.spdy import SpdyConnection
from tpconf.tunnel.stream import SubsystemStream, TCPChannelStream, UnixChannelStream

log = logging.getLogger(__name__)


class RemoteForward:
    """A port the agent listens on; each connection to it is delivered to a local TCP address."""

    def __init__(self, listener: asyncssh.SSHListener, *, bind_host: str, local: str) -> None:
        self._listener = listener
        self.bind_host = bind_host
        self.local = local

    @property
    def port(self) -> int:
        """The port the agent listens on (the one allocated, when 0 was asked)."""
        return self._listener.get_port()

    def close(self) -> None:
        """Stop listening in the pod; connections already delivered stay open."""
        self._listener.close()

    async def aclose(self) -> None:
        """:meth:`close`, and wait until the agent has stopped listening."""
        self._listener.close()
        await self._listener.wait_closed()


class _Client(asyncssh.SSHClient):
    def __init__(self) -> None:
        self.closed = anyio.Event()
        self.reason: str = "the SSH connection was closed"

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.reason = f"the SSH connection was lost: {exc}"
        self.closed.set()


class Tunnel:
    """An SSH connection to one agent. Implements :class:`tpconf.net.Dialer`."""

    def __init__(
        self,
        conn: asyncssh.SSHClientConnection,
        client: _Client,
        *,
        where: str,
        settings: TunnelSettings,
    ) -> None:
        self._conn = conn
        self._client = client
        self._settings = settings
        self.where = where
        """Where the agent was reached, for messages (``127.0.0.1:40123``)."""
        self.relay: MuxSession | None = None
        """The relay ``dial()`` uses, once it runs (until then, and without one, ``dial()``
        opens SSH channels)."""
        self._relay_start: asyncio.Task[None] | None = None

    def _start_relay_soon(self, link: SpdyConnection) -> None:
        """Start the relay beside the connection: the tunnel is usable at once (over SSH), and
        the relay takes over ``dial()`` when it is up. Starting it costs a Python start in the
        pod (0.1-0.3 s on a busy node), which ``up``'s readiness must not wait for."""

        async def start() -> None:
            try:
                self.relay = await _start_relay(
                    self._conn, link, where=self.where, settings=self._settings
                )
            except TunnelDown as exc:
                log.warning("%s; connections go through SSH", exc.message)

        self._relay_start = asyncio.ensure_future(start())

    def _stop_relay_start(self) -> None:
        if self._relay_start is not None:
            self._relay_start.cancel()

    async def relay_ready(self) -> MuxSession | None:
        """Wait until the relay is up (or could not start); the relay, or ``None``."""
        if self._relay_start is not None:
            with anyio.move_on_after(self._settings.relay_timeout + 1):
                await asyncio.shield(self._relay_start)
        return self.relay

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (dropped or closed)."""
        return self._client.closed.is_set()

    async def wait_closed(self) -> str:
        """Wait until the connection is gone; return why, in words."""
        await self._client.closed.wait()
        return self._client.reason

    def close(self) -> None:
        """Close the connection; every channel and remote forward on it ends."""
        self._conn.close()

    def _down(self, exc: BaseException) -> TunnelDown:
        return TunnelDown(
            f"the SSH connection to the agent at {self.where} is down: {exc}",
            hint="tpconf reconnects by itself; if this persists, check the proxy pod with"
            " `kubectl get pods`",
        )

    async def dial(self, host: str, port: int) -> ByteStream:
        """Open a TCP connection from the agent pod to ``host:port`` (one ``direct-tcpip`` channel).

        Raises ``OSError`` (``ConnectionRefusedError``, ``socket.gaierror``…) when the pod could
        not connect, :class:`TunnelDown` when the SSH connection is gone, and
        :class:`TunnelError` when the agent refuses to forward at all.
        """
        if self.closed:
            raise self._down(ConnectionError(self._client.reason))
        if self.relay is not None:
            return await self.relay.dial(host, port)
        settings = self._settings
        try:
            _chan, session = await self._conn.create_connection(
                lambda: TCPChannelStream(read_limit=settings.read_limit),
                host,
                port,
                window=settings.channel_window,
                max_pktsize=settings.channel_max_packet,
            )
        except asyncssh.ChannelOpenError as exc:
            if self.closed:
                raise self._down(exc) from exc
            raise _open_error(host, port, exc) from exc
        except (asyncssh.Error, OSError) as exc:
            raise self._down(exc) from exc
        assert isinstance(session, TCPChannelStream)
        return session

    async def dial_early(self, host: str, port: int) -> ByteStream:
        """Like :meth:`dial`, but returns before the pod has connected when the relay runs
        (one round trip less): for a client that is already connected (vpn-tcp). A failed
        connect then breaks the stream; :func:`dial_failure` says why."""
        if self.relay is not None and not self.closed:
            return await self.relay.dial(host, port, early=True)
        return await self.dial(host, port)

    async def open_unix(self, path: str) -> ByteStream:
        """Connect, from the agent, to the Unix socket at ``path`` in the pod (the intercept
        router's control socket); the agent's sshd must allow stream-local forwarding."""
        if self.closed:
            raise self._down(ConnectionError(self._client.reason))
        try:
            _chan, session = await self._conn.create_unix_connection(
                lambda: UnixChannelStream(read_limit=self._settings.read_limit), path
            )
        except asyncssh.ChannelOpenError as exc:
            if self.closed:
                raise self._down(exc) from exc
            raise TunnelError(
                f"the agent at {self.where} refused a connection to {path}: {exc.reason}",
                hint="the proxy pod does not run the intercept agent (the image may be older "
                "than this tpconf: load the agent image of this version where the cluster pulls it, "
                "or set `agent-image` in telepresence.yaml)",
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            raise self._down(exc) from exc
        assert isinstance(session, UnixChannelStream)
        return session

    async def forward_remote(
        self,
        remote_port: int,
        local_port: int,
        *,
        local_host: str = "127.0.0.1",
        bind_host: str = "0.0.0.0",
    ) -> RemoteForward:
        """Make the agent listen on ``bind_host:remote_port`` and deliver to ``local_host:local_port``.

        ``remote_port`` 0 lets the agent choose (see :attr:`RemoteForward.port`). Raises
        :class:`ForwardFailed` when the agent cannot listen there.
        """
        try:
            listener = await self._conn.forward_remote_port(
                bind_host, remote_port, local_host, local_port
            )
        except asyncssh.ChannelListenError as exc:
            raise _forward_failed(remote_port, bind_host, exc) from exc
        except (asyncssh.Error, OSError) as exc:
            raise self._down(exc) from exc
        return RemoteForward(listener, bind_host=bind_host, local=f"{local_host}:{local_port}")

    async def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        """Run ``command`` on the agent (through its login shell); collect status and output."""
        limit = self._settings.command_timeout if timeout is None else timeout
        try:
            with anyio.fail_after(limit):
                result = await self._conn.run(command, check=False, encoding=None)
        except TimeoutError as exc:
            raise TunnelError(
                f"`{command}` did not finish within {limit:g} s on the agent at {self.where}"
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            raise self._down(exc) from exc
        status = result.exit_status if result.exit_status is not None else result.returncode
        return CommandResult(
            exit_status=-1 if status is None else status,
            stdout=_as_bytes(result.stdout),
            stderr=_as_bytes(result.stderr),
        )

    async def open_sftp_stream(self) -> ByteStream:
        """Start the agent's ``sftp`` subsystem; return its stdin/stdout as one byte stream
        (over the relay when it runs: no SSH framing and encryption on the volumes' reads).

        This is how volumes share the tunnel: run ``sshfs -o passive,ro :/ MOUNTPOINT`` (sshfs
        then speaks SFTP on its own stdin/stdout instead of starting ssh) and copy bytes both
        ways between the child's pipes and this stream; close the stream to end the mount.
        """
        relay = await self.relay_ready()  # the volumes' reads are the bulk: wait for it
        if relay is not None:
            try:
                return await relay.open_subsystem("sftp")
            except OSError as exc:
                raise TunnelError(
                    f"the agent at {self.where} could not start sftp-server: {exc}",
                    hint="the agent image needs openssh-sftp-server (tpconf/agent/Dockerfile)",
                ) from exc
        try:
            _chan, session = await self._conn.create_session(
                lambda: SubsystemStream(read_limit=self._settings.read_limit),
                subsystem="sftp",
                encoding=None,
                window=self._settings.channel_window,
                max_pktsize=self._settings.channel_max_packet,
            )
        except asyncssh.ChannelOpenError as exc:
            if self.closed:
                raise self._down(exc) from exc
            raise TunnelError(
                f"the agent at {self.where} refused to start sftp: {exc.reason}",
                hint="the agent image needs sftp-server and `Subsystem sftp` in its sshd_config",
            ) from exc
        except (asyncssh.Error, OSError) as exc:
            raise self._down(exc) from exc
        assert isinstance(session, SubsystemStream)
        return session


def dial_failure(stream: ByteStream) -> BaseException | None:
    """Why an early-dialed stream (:meth:`Tunnel.dial_early`) could not connect, if it could
    not."""
    return stream.open_error if isinstance(stream, MuxChannel) else None


def _as_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    return b""


#: Errors the agent's sshd reports (as strerror text) when a direct-tcpip connect fails.
_OPEN_ERRNOS = (
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.EADDRNOTAVAIL,
)
_NAME_ERRORS = ("name or service not known", "name resolution", "nodename nor servname")
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]")


def _open_error(host: str, port: int, exc: asyncssh.ChannelOpenError) -> Exception:
    """The exception ``dial`` raises for a refused channel: an OSError when the pod's connect failed."""
    reason = exc.reason or "channel open failed"
    where = f"{host}:{port}"
    if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
        return TunnelError(
            f"the agent refused to forward a connection to {where}: {reason}",
            hint="the agent's sshd_config needs `AllowTcpForwarding yes` and `PermitOpen any`",
        )
    lowered = reason.lower()
    if any(text in lowered for text in _NAME_ERRORS):
        return socket.gaierror(socket.EAI_NONAME, f"{host}: {reason} (resolved in the pod)")
    match = _ERRNO_IN_TEXT.search(reason)
    if match:
        code = int(match.group(1))
        return OSError(code, f"{where} from the pod: {reason}")
    for code in _OPEN_ERRNOS:
        if os.strerror(code).lower() in lowered:
            return OSError(code, f"{where} from the pod: {reason}")
    return OSError(errno.ECONNREFUSED if "refused" in lowered else errno.EIO, f"{where}: {reason}")


def _forward_failed(port: int, bind_host: str, exc: asyncssh.ChannelListenError) -> ForwardFailed:
    if 0 < port < 1024:
        hint = (
            f"ports below 1024 need the NET_BIND_SERVICE capability in the agent container (the"
            f" privileged agent variant); or choose a remote port of 1024 or more in `expose`;"
            f" otherwise another container in the pod already listens on {port}"
        )
    else:
        hint = (
            f"another process or container in the pod already listens on {port}: choose another"
            " remote port in `expose`, or stop the container that uses it"
        )
    return ForwardFailed(
        f"the proxy pod could not listen on port {port} ({bind_host}) for `expose`: {exc}",
        hint=hint,
    )


def _connect_error(exc: BaseException, where: str, username: str) -> TunnelError:
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return HostKeyMismatch(
            f"the SSH server at {where} presented a host key other than the one tpconf generated"
            f" for this proxy; refusing to connect ({exc})",
            hint="something other than this proxy's agent answers on that port (a re-created"
            " proxy, or an interception): run `tpconf down` and `tpconf up` to re-create it",
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        return TunnelError(
            f"the agent at {where} refused tpconf's client key for user {username!r} ({exc})",
            hint="the agent must read `authorized_keys` from the proxy's Secret; run `tpconf down`"
            " and `tpconf up` to re-create the proxy and its keys",
        )
    if isinstance(exc, asyncssh.KeyExchangeFailed):
        return TunnelError(
            f"no common SSH algorithms with the agent at {where} ({exc})",
            hint="the agent's sshd must offer an ed25519 host key (the one from the proxy's Secret)",
        )
    return TunnelDown(
        f"could not open an SSH connection to the agent at {where}: {exc or type(exc).__name__}",
        hint="tpconf retries by itself; if this persists, check the proxy pod with"
        " `kubectl get pods` and `kubectl logs`",
    )


@contextmanager
def _connect_errors(where: str, username: str) -> Iterator[None]:
    try:
        yield
    except (asyncssh.Error, OSError) as exc:  # TimeoutError is an OSError
        raise _connect_error(exc, where, username) from exc


def _import_keys(credentials: Credentials) -> tuple[asyncssh.SSHKey, asyncssh.SSHKey]:
    try:
        client_key = asyncssh.import_private_key(credentials.client_key)
        host_key = asyncssh.import_public_key(credentials.host_key)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise TunnelError(
            f"the proxy's SSH keys do not parse: {exc}",
            hint="run `tpconf down` and `tpconf up` to re-create the proxy and its keys",
        ) from exc
    return client_key, host_key


@asynccontextmanager
async def open_tunnel(
    endpoint: Endpoint,
    credentials: Credentials,
    *,
    settings: TunnelSettings = DEFAULT_SETTINGS,
) -> AsyncIterator[Tunnel]:
    """Connect to the agent's sshd at ``endpoint``; close the connection on exit.

    Raises :class:`HostKeyMismatch` if the server's key is not ``credentials.host_key``,
    :class:`TunnelError` if our key is refused, :class:`TunnelDown` for network failures.
    """
    client_key, host_key = _import_keys(credentials)
    link: SpdyConnection | None = None
    sock: socket.socket | None = None
    if isinstance(endpoint, SpdyConnection):
        host, port, where = "localhost", AGENT_SSH_PORT, endpoint.where
        link = endpoint
    elif isinstance(endpoint, socket.socket):
        # A nominal peer: asyncssh would otherwise ask the socket for its peer name, and the
        # kubernetes client's port-forward socket is a socketpair end that has none. The name
        # is not trusted for anything: the host key is pinned by key.
        host, port, where = "localhost", AGENT_SSH_PORT, "a connected socket"
        sock = endpoint
    else:
        host, port = endpoint
        where = f"{host}:{port}"
    connector = CoalescingConnector(sock=sock, link=link, max_coalesce=settings.write_coalesce)
    client = _Client()
    with _connect_errors(where, credentials.username):
        conn, _ = await asyncssh.create_connection(
            lambda: client,
            host,
            port,
            tunnel=connector,  # opens the byte path; coalesces packet writes (coalesce.py)
            username=credentials.username,
            client_keys=[client_key],
            known_hosts=([host_key], [], []),  # pinned: this key and no other
            preferred_auth="publickey",
            agent_path=None,  # never offer the user's ssh-agent keys
            config=None,  # never read ~/.ssh/config
            encryption_algs=list(CIPHERS),
            keepalive_interval=settings.keepalive_interval,
            keepalive_count_max=settings.keepalive_count_max,
            connect_timeout=settings.connect_timeout,
        )
    log.debug("SSH connection to the agent at %s is up", where)
    tunnel = Tunnel(conn, client, where=where, settings=settings)
    try:
        if link is not None and settings.relay:
            tunnel._start_relay_soon(link)
        yield tunnel
    finally:
        tunnel._stop_relay_start()
        with anyio.CancelScope(shield=True), anyio.move_on_after(settings.close_timeout):
            conn.close()
            await conn.wait_closed()
        conn.abort()


async def _start_relay(
    conn: asyncssh.SSHClientConnection,
    link: SpdyConnection,
    *,
    where: str,
    settings: TunnelSettings,
) -> MuxSession | None:
    """Start the agent's relay over ``conn`` and connect to it through ``link``; ``None`` (and
    ``dial()`` stays on SSH) when the agent has no relay (an image older than this tpconf).

    The relay lives as long as its exec session; when it or its stream ends, the SSH connection
    is closed too, so the tunnel reconnects as one (never half of it working)."""
    key = new_key()
    try:
        with anyio.fail_after(settings.relay_timeout):
            process = await conn.create_process(RELAY_COMMAND, encoding=None)
            process.stdin.write(key.hex().encode() + b"\n")
            line = await process.stdout.readline()
            if not line.strip().isdigit():
                process.close()
                err = await process.stderr.read(2048)
                log.info(
                    "the agent at %s has no relay (%s): connections go through SSH",
                    where,
                    (err or line).decode(errors="replace").strip()[:200] or "no answer",
                )
                return None
            port = int(line)
            stream, session = link.open_port(
                port, lambda: MuxSession(key, window=settings.relay_window, where=where)
            )
            assert isinstance(session, MuxSession)
            await session.handshake(settings.relay_timeout)
    except (TimeoutError, TunnelDown, asyncssh.Error, OSError) as exc:
        raise TunnelDown(
            f"could not start the relay of the agent at {where}: {exc or type(exc).__name__}",
            hint="tpconf retries by itself; set the tunnel's relay off to use SSH only",
        ) from exc

    def closed(_: object) -> None:
        if not conn.is_closed():
            log.info("the relay at %s ended; reconnecting the tunnel", where)
            conn.close()

    session.lost.add_done_callback(closed)
    watch = asyncio.ensure_future(process.wait_closed())
    watch.add_done_callback(closed)
    session.owned += [process, watch, stream]
    log.debug("relay of the agent at %s on pod port %d", where, port)
    return session
