"""Real local peers for the tunnel tests: an asyncssh server playing the agent, TCP servers.

The agent server authenticates only the proxy's client key, presents the proxy's host key,
allows ``direct-tcpip`` and remote forwards, runs commands with ``/bin/sh -c`` and serves sftp,
like the agent's OpenSSH sshd; ``tpconf-agent relay`` runs the agent's relay in this process.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import asyncssh
from anyio.abc import SocketStream

from tpconf.agent import relay
from tpconf.tunnel import ProxyKeys
from tpconf.tunnel.settings import RELAY_COMMAND


class _Server(asyncssh.SSHServer):
    def __init__(self, owner: AgentServer) -> None:
        self._owner = owner

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._owner.connections.append(conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        return True

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return True


class _ProcessOut:
    """A relay's port line, written to the exec session's stdout."""

    def __init__(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        self._process = process

    def write(self, text: str) -> None:
        self._process.stdout.write(text.encode())

    def flush(self) -> None:
        pass


async def _relay(process: asyncssh.SSHServerProcess[bytes]) -> None:
    """``tpconf-agent relay``, run in this process as the agent's exec session runs it."""
    line = await process.stdin.readline()
    key = bytes.fromhex(line.decode().strip())
    loop = asyncio.get_running_loop()
    stdin_closed: asyncio.Future[None] = loop.create_future()

    async def watch() -> None:
        while await process.stdin.read(65536):
            pass
        if not stdin_closed.done():
            stdin_closed.set_result(None)

    watcher = loop.create_task(watch())
    try:
        code = await relay.serve(key, port_out=_ProcessOut(process), stdin_closed=stdin_closed)
    finally:
        watcher.cancel()
    process.exit(code)


async def _run_command(process: asyncssh.SSHServerProcess[bytes]) -> None:
    if process.command == RELAY_COMMAND:
        await _relay(process)
        return
    result = await anyio.run_process(["/bin/sh", "-c", process.command or ""], check=False)
    process.stdout.write(result.stdout)
    process.stderr.write(result.stderr)
    process.exit(result.returncode)


class AgentServer:
    """An in-process SSH server on 127.0.0.1 that can be killed and started again."""

    def __init__(self, keys: ProxyKeys, *, host_private_key: str | None = None) -> None:
        self.keys = keys
        self._host_key = asyncssh.import_private_key(host_private_key or keys.host_private_key)
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self.connections: list[asyncssh.SSHServerConnection] = []
        self.port = 0

    def _options(self) -> asyncssh.SSHServerConnectionOptions:
        return asyncssh.SSHServerConnectionOptions(
            server_host_keys=[self._host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(self.keys.client_public_key),
            server_factory=lambda: _Server(self),
            process_factory=_run_command,
            sftp_factory=True,
            encoding=None,
        )

    async def start(self, port: int = 0) -> None:
        self._acceptor = await asyncssh.listen(
            "127.0.0.1", port or self.port, options=self._options(), reuse_address=True
        )
        self.port = self._acceptor.get_port()

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve one SSH connection on an already-connected socket (returns once authenticated)."""
        await asyncssh.run_server(sock, options=self._options())

    async def kill(self) -> None:
        """Stop listening and drop every connection, as a deleted pod would."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        for conn in self.connections:
            conn.abort()
        self.connections.clear()


@asynccontextmanager
async def agent_server(
    keys: ProxyKeys, *, host_private_key: str | None = None
) -> AsyncIterator[AgentServer]:
    server = AgentServer(keys, host_private_key=host_private_key)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


async def _echo(stream: SocketStream) -> None:
    async with stream:
        try:
            async for chunk in stream:
                await stream.send(chunk)
        except anyio.BrokenResourceError:
            pass


async def _reply_after_eof(stream: SocketStream) -> None:
    """Reads everything until EOF, then answers: only works if half-close gets through."""
    async with stream:
        received = b""
        async for chunk in stream:
            received += chunk
        await stream.send(b"got " + received.upper())


async def _sink(stream: SocketStream) -> None:
    """Reads everything until EOF, then answers with the byte count (8 bytes, big-endian)."""
    async with stream:
        received = 0
        async for chunk in stream:
            received += len(chunk)
        await stream.send(received.to_bytes(8, "big"))


async def _source(stream: SocketStream) -> None:
    """Reads a byte count (8 bytes, big-endian), sends that many zero bytes, closes."""
    async with stream:
        header = b""
        while len(header) < 8:
            header += await stream.receive(8 - len(header))
        remaining = int.from_bytes(header, "big")
        block = bytes(256 * 1024)
        while remaining > 0:
            await stream.send(block[:remaining])
            remaining -= len(block)


_HANDLERS = {"echo": _echo, "reply-after-eof": _reply_after_eof, "sink": _sink, "source": _source}


@asynccontextmanager
async def tcp_server(kind: str = "echo") -> AsyncIterator[int]:
    """A loopback TCP server (``echo``, ``reply-after-eof``, ``sink`` or ``source``); yields
    its port."""
    handler = _HANDLERS[kind]
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handler)
            yield port
            tg.cancel_scope.cancel()


class FreezableProxy:
    """A TCP proxy that can stop passing bytes without closing anything: a vanished pod."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen = False
        self._thawed = anyio.Event()

    def freeze(self) -> None:
        self.frozen = True
        self._thawed = anyio.Event()

    async def _pump(self, source: SocketStream, sink: SocketStream) -> None:
        try:
            async for chunk in source:
                if self.frozen:
                    await self._thawed.wait()
                await sink.send(chunk)
            await sink.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def _handle(self, client: SocketStream) -> None:
        async with (
            client,
            await anyio.connect_tcp("127.0.0.1", self.upstream_port) as upstream,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(self._pump, client, upstream)
            tg.start_soon(self._pump, upstream, client)


@asynccontextmanager
async def freezable_proxy(upstream_port: int) -> AsyncIterator[tuple[FreezableProxy, int]]:
    proxy = FreezableProxy(upstream_port)
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, proxy._handle)
            yield proxy, port
            tg.cancel_scope.cancel()
