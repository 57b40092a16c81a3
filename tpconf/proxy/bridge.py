"""The bridge of the container method: how a container with no network reaches the cluster.

The proxy container (``tpconf/agent/netproxy.py``) has loopback only; every TCP connection and
DNS query of the app container that shares its network namespace ends up, one connection each,
on a Unix socket in a directory bind-mounted into it. :class:`Bridge` serves that socket here,
where the deployment's tunnel is. The first line of a connection says what it is for:

``CONNECT HOST PORT``
    a TCP connection to ``HOST:PORT`` (the address the app dialled): dialled from the proxy pod
    through the :class:`~tpconf.net.Dialer`, answered ``OK`` and then relayed (half-close
    kept), or answered ``ERR why`` and closed;
``DNS``
    DNS messages, each with the two-byte length prefix of DNS over TCP, answered in order by
    the :class:`~tpconf.proxy.resolver.ClusterResolver` (the pod's nameserver, with its cache).
    The app's own resolver applies the pod's search list (its resolv.conf says so), so every
    question is asked exactly as written.

:func:`inbound` is the other direction, for `expose`: a connection to a loopback port here is
carried into the namespace through the socket the proxy container serves (``PORT``, then bytes).

The socket's directory is created ``0700`` by the caller: only its owner (and root, as the
engine runs the container) can reach the cluster through it.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteStream, SocketStream, TaskStatus

from tpconf import errors
from tpconf.net import MAX_CONNECTIONS, relay

if TYPE_CHECKING:
    from tpconf.net import Dialer
    from tpconf.proxy.resolver import ClusterResolver

log = logging.getLogger(__name__)

#: The longest first line accepted (``CONNECT`` + a 253-character name + a port).
MAX_LINE = 300
#: A client gets this long to send its first line.
LINE_TIMEOUT = 10.0


class _Lines:
    """Reads a first line off a stream, keeping what came after it."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.rest = b""

    async def line(self) -> str:
        while b"\n" not in self.rest:
            if len(self.rest) > MAX_LINE:
                raise ValueError("first line too long")
            self.rest += await self.stream.receive(MAX_LINE)
        line, _, self.rest = self.rest.partition(b"\n")
        return line.decode("ascii").strip()

    async def exactly(self, size: int) -> bytes:
        while len(self.rest) < size:
            self.rest += await self.stream.receive(max(size - len(self.rest), 4096))
        data, self.rest = self.rest[:size], self.rest[size:]
        return data


class Bridge:
    """Serves the container's connections to the cluster on a Unix socket (see the module)."""

    def __init__(
        self, dialer: Dialer, resolver: ClusterResolver, *, max_connections: int = MAX_CONNECTIONS
    ) -> None:
        self.dialer = dialer
        self.resolver = resolver
        self.max_connections = max_connections
        self.active = 0
        #: Connections relayed, DNS questions answered: for tests and the status line.
        self.connections = 0
        self.questions = 0

    async def serve(self, path: Path, *, task_status: TaskStatus[None]) -> None:
        """Listen on ``path`` (replacing a stale socket) until cancelled."""
        socket_file = anyio.Path(path)
        await socket_file.unlink(missing_ok=True)
        listener = await anyio.create_unix_listener(path)
        await socket_file.chmod(0o600)
        try:
            async with listener:
                task_status.started()
                await listener.serve(self._client)
        finally:
            with anyio.CancelScope(shield=True):
                await socket_file.unlink(missing_ok=True)

    async def _client(self, stream: SocketStream) -> None:
        async with stream:
            if self.active >= self.max_connections:
                log.warning("bridge: %d connections at once; refusing more", self.active)
                return
            self.active += 1
            try:
                await self._serve_one(stream)
            except (OSError, anyio.EndOfStream, anyio.BrokenResourceError, ValueError) as exc:
                log.debug("bridge: connection ended: %s", exc)
            finally:
                self.active -= 1

    async def _serve_one(self, stream: SocketStream) -> None:
        lines = _Lines(stream)
        with anyio.fail_after(LINE_TIMEOUT):
            first = await lines.line()
        match first.split():
            case ["CONNECT", host, port] if port.isdigit() and 0 < int(port) < 65536:
                await self._connect(stream, lines, host, int(port))
            case ["DNS"]:
                await self._dns(stream, lines)
            case _:
                await stream.send(b"ERR unknown request\n")

    async def _connect(self, stream: SocketStream, lines: _Lines, host: str, port: int) -> None:
        try:
            upstream = await self.dialer.dial(host, port)
        except (OSError, errors.TpconfError) as exc:
            why = exc.message if isinstance(exc, errors.TpconfError) else str(exc.strerror or exc)
            log.info("bridge: %s:%d from the pod: %s", host, port, why)
            reason = " ".join(why.split())[:200]
            await stream.send(f"ERR {reason}\n".encode(errors="replace"))
            return
        self.connections += 1
        async with upstream:
            await stream.send(b"OK\n")
            if lines.rest:  # sent before the answer: not what netproxy does, but not lost
                await upstream.send(lines.rest)
            await relay(stream, upstream)

    async def _dns(self, stream: SocketStream, lines: _Lines) -> None:
        while True:
            try:
                (size,) = struct.unpack("!H", await lines.exactly(2))
            except anyio.EndOfStream:
                return
            query = await lines.exactly(size)
            try:
                reply = await self.resolver.exchange(query)
            except (ValueError, errors.TpconfError) as exc:
                log.info("bridge: DNS query not answered: %s", exc)
                return  # the client's resolver tries again, or gives up: SERVFAIL-like
            self.questions += 1
            await stream.send(struct.pack("!H", len(reply)) + reply)


async def inbound(client: ByteStream, socket_path: Path, port: int) -> None:
    """Carry ``client`` to ``127.0.0.1:port`` in the container's namespace (for `expose`)."""
    async with client:
        try:
            inside = await anyio.connect_unix(socket_path)
        except OSError as exc:
            log.info("expose %d: the proxy container is not reachable: %s", port, exc)
            return
        async with inside:
            await inside.send(f"{port}\n".encode())
            await relay(client, inside)
