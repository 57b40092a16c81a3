"""The agent's relay: the data path of ``dial()`` without SSH (docs/architecture.md, "How one
connection flows"; the wire format is :mod:`tpconf.tunnel.mux`'s, kept in step by tests).

tpconf starts it over its SSH connection (``tpconf-agent relay``, an exec session) and writes a
fresh random key on its stdin. The relay listens on 127.0.0.1 (port 0: the kernel picks one),
prints the port, accepts **one** connection (tpconf's, through the API server's port-forward),
closes the listener and authenticates it by challenge and response with the key (HMAC-SHA256,
both ways). From then on that one connection carries every ``dial()`` of the session, and
the volumes' SFTP (``OPEN_SUBSYSTEM sftp``: ``sftp-server`` on the channel), as channels: ``OPEN host port`` → the relay connects from the pod → ``OPEN_OK`` or ``OPEN_FAIL``
with the errno; ``DATA``, ``EOF`` (half-close), ``CLOSE``; ``WINDOW`` re-opens a channel's send
window as the receiver consumes, so neither side ever holds more than a window per channel and
neither ever stops reading the connection (the runtime's port-forward has no flow control: a
stream that is not read stalls every other, see ``tpconf/tunnel/spdy.py``).

So: only the holder of this SSH session's key can use the relay, nothing listens on the pod IP,
and the listener exists only until tpconf's connection arrives. The relay ends with the SSH
session (stdin closed) or the connection.

Standard library only (Debian's python3 in the image; uvloop when installed).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import os
import socket
import struct
import subprocess
import sys
from typing import Any, Protocol

MAGIC = b"TPRELAY1"
NONCE = 32
CLIENT_LABEL = b"tpconf-relay client"
SERVER_LABEL = b"tpconf-relay server"

OPEN, OPEN_OK, OPEN_FAIL, DATA, EOF, CLOSE, WINDOW, OPEN_SUBSYSTEM = 1, 2, 3, 4, 5, 6, 7, 8
#: The subsystems ``OPEN_SUBSYSTEM`` may start (the volumes' sshfs speaks SFTP to this one).
SUBSYSTEMS = {"sftp": ["/usr/lib/openssh/sftp-server"]}
HEADER = struct.Struct(">BII")
#: Queued bytes at which frames are written at once rather than at the end of the turn.
COALESCE = 1024 * 1024
#: Largest payload of a frame either side sends or accepts.
MAX_FRAME = 1024 * 1024
#: Receive window the relay announces per channel (bytes it may hold for a slow upstream).
WINDOW_SIZE = 4 * 1024 * 1024
#: Seconds to wait for tpconf's connection and for the handshake.
ACCEPT_TIMEOUT = 30.0
#: Seconds the relay waits, when its session ends, for its subsystems' programs to exit.
REAP_TIMEOUT = 5.0
FAIL_OSERROR, FAIL_GAIERROR = 0, 1


def _literal_family(host: str) -> int | None:
    """The address family of an IP literal, or None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


def mac(key: bytes, label: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, label + nonce, hashlib.sha256).digest()


class Upstream(asyncio.Protocol):
    """The pod-side TCP connection of one channel: ``transport`` is read and written."""

    def __init__(self, mux: Mux, channel: int, window: int) -> None:
        self.mux = mux
        self.channel = channel
        self.transport: Any = None  # what is read (paused while tpconf's window is shut)
        self.writer: Any = None  # what tpconf's bytes go to
        self.send_window = window  # bytes tpconf will still take on this channel
        self.pending: list[memoryview] = []
        self.pending_size = 0
        self.eof_pending = False
        self.received = 0  # DATA bytes from tpconf written to the transport
        self.acked = 0  # ... of which acknowledged with WINDOW
        self.paused = False
        self.closed = False
        self.early: list[bytes] = []  # DATA that came while connecting (tpconf may not wait)
        self.early_eof = False

    def connection_made(self, transport: Any) -> None:  # uvloop's are not asyncio.Transport
        self.transport = self.writer = transport
        transport.set_write_buffer_limits(high=WINDOW_SIZE // 4, low=0)
        self.connected()

    def connected(self) -> None:
        """Hand the writer what came before it existed."""
        early, self.early = self.early, []
        for data in early:
            self.write(data)
        if self.early_eof and self.writer.can_write_eof():
            self.writer.write_eof()

    def data_received(self, data: bytes) -> None:
        self.pending.append(memoryview(data))
        self.pending_size += len(data)
        self.flush()

    def eof_received(self) -> bool:
        self.eof_pending = True
        self.flush()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.flush()
            self.mux.close_channel(self.channel, abort=exc is not None)

    def flush(self) -> None:
        """Send what waits, as far as tpconf's window allows; pause the socket otherwise."""
        while self.pending and self.send_window > 0:
            chunk = self.pending[0]
            take = min(len(chunk), self.send_window, MAX_FRAME)
            if take == len(chunk):
                self.pending.pop(0)
            else:
                self.pending[0] = chunk[take:]
                chunk = chunk[:take]
            self.pending_size -= take
            self.send_window -= take
            self.mux.send(DATA, self.channel, chunk)
        if self.transport is None:
            return
        if self.pending_size and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        elif not self.pending_size and self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self.eof_pending and not self.pending:
            self.eof_pending = False
            self.mux.send(EOF, self.channel)

    def write(self, data: bytes | memoryview) -> None:
        if self.closed:
            return
        if self.writer is None:  # still connecting: at most tpconf's early window waits here
            self.early.append(bytes(data))
            return
        self.writer.write(data)
        self.received += len(data)
        self.ack()

    def ack(self) -> None:
        """Re-open tpconf's window by what the kernel took (what still waits in our buffer
        counts against it)."""
        if self.writer is None:
            return
        delivered = self.received - self.writer.get_write_buffer_size()
        if delivered - self.acked >= WINDOW_SIZE // 4:
            self.mux.send(WINDOW, self.channel, struct.pack(">I", delivered - self.acked))
            self.acked = delivered

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        self.ack()  # the buffer is empty: everything received is delivered


class Subsystem(Upstream, asyncio.SubprocessProtocol):
    """A channel to a program's stdin and stdout (``sftp-server`` for the volumes). It ends
    (``connection_lost``) once the program has exited and its pipes are drained."""

    process: Any = None

    def __init__(self, mux: Mux, channel: int, window: int) -> None:
        super().__init__(mux, channel, window)
        # Done once the program has exited and been waited for (or never started): the relay
        # waits for it before it returns, so that no program outlives it unwaited.
        self.ended: asyncio.Future[None] = mux.loop.create_future()
        mux.subsystems.add(self)

    def finish(self) -> None:
        self.mux.subsystems.discard(self)
        if not self.ended.done():
            self.ended.set_result(None)

    def connection_made(self, transport: Any) -> None:
        self.process = transport
        self.transport = transport.get_pipe_transport(1)
        self.writer = transport.get_pipe_transport(0)
        self.writer.set_write_buffer_limits(high=WINDOW_SIZE // 4, low=0)
        self.connected()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.data_received(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self.eof_received()

    def process_exited(self) -> None:
        pass  # connection_lost follows once stdout is drained

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.process is not None:
            self.process.close()
        self.finish()

    def close(self, *, abort: bool) -> None:
        self.closed = True
        if self.process is not None and self.process.get_returncode() is None:
            self.process.kill() if abort else self.writer.close()


class Mux(asyncio.Protocol):
    """tpconf's one connection: frames in, channels out."""

    def __init__(self, key: bytes, nonce: bytes, done: asyncio.Future[None]) -> None:
        self.key = key
        self.nonce = nonce
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.authenticated = False
        self.head = bytearray()  # the nonce answer, then each frame header
        self.kind = self.channel = self.remaining = 0  # the frame being received
        self.payload = bytearray()
        self.channels: dict[int, Upstream] = {}  # connected or still connecting
        self.subsystems: set[Subsystem] = set()  # whose programs have not been waited for yet
        self.loop = asyncio.get_running_loop()
        self.out: list[bytes | memoryview] = []  # frames of this event-loop turn (see send)
        self.out_size = 0
        self.flush_scheduled = False

    def connection_made(self, transport: Any) -> None:  # uvloop's are not asyncio.Transport
        self.transport = transport
        transport.write(MAGIC + self.nonce)

    def connection_lost(self, exc: Exception | None) -> None:
        for upstream in list(self.channels.values()):
            upstream.closed = True
            if not isinstance(upstream, Subsystem) and upstream.transport is not None:
                upstream.transport.abort()
        self.channels.clear()
        # Every subsystem, its channel open or already ended, is in self.subsystems.
        for subsystem in list(self.subsystems):
            subsystem.close(abort=True)
        if not self.done.done():
            self.done.set_result(None)

    async def reap(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until every subsystem's program has exited and been
        waited for; the end of the session kills them."""
        ended = [subsystem.ended for subsystem in self.subsystems]
        if ended:
            await asyncio.wait(ended, timeout=timeout)

    def data_received(self, data: bytes) -> None:
        if not self.authenticated:
            self.head += data
            if len(self.head) < NONCE:
                return
            answer, data = bytes(self.head[:NONCE]), bytes(self.head[NONCE:])
            self.head = bytearray()
            if not hmac.compare_digest(answer, mac(self.key, CLIENT_LABEL, self.nonce)):
                sys.stderr.write("tpconf-agent relay: a connection failed authentication\n")
                assert self.transport is not None
                self.transport.abort()
                return
            self.authenticated = True
            self.send_raw(mac(self.key, SERVER_LABEL, self.nonce))
        # A DATA payload goes upstream as it arrives (no reassembly); other frames are collected.
        pos, size = 0, len(data)
        view = memoryview(data)
        while pos < size:
            if self.remaining:
                take = min(self.remaining, size - pos)
                chunk = data if take == size else view[pos : pos + take]  # no copy
                pos += take
                self.remaining -= take
                if self.kind == DATA:
                    upstream = self.channels.get(self.channel)
                    if upstream is not None:
                        upstream.write(chunk)
                else:
                    self.payload += chunk
                    if not self.remaining:
                        self.frame(self.kind, self.channel, bytes(self.payload))
                continue
            need = HEADER.size - len(self.head)
            self.head += data[pos : pos + need]
            pos += min(need, size - pos)
            if len(self.head) < HEADER.size:
                continue
            self.kind, self.channel, self.remaining = HEADER.unpack(self.head)
            self.head = bytearray()
            if self.remaining > MAX_FRAME:
                assert self.transport is not None
                self.transport.abort()
                return
            self.payload = bytearray()
            if not self.remaining and self.kind != DATA:
                self.frame(self.kind, self.channel, b"")

    def frame(self, kind: int, channel: int, payload: bytes) -> None:
        upstream = self.channels.get(channel)
        if kind == WINDOW:
            if upstream is not None:
                (increment,) = struct.unpack(">I", payload)
                upstream.send_window += increment
                upstream.flush()
        elif kind == EOF:
            if upstream is not None:
                if upstream.writer is None:
                    upstream.early_eof = True
                elif upstream.writer.can_write_eof():
                    upstream.writer.write_eof()
        elif kind == CLOSE:
            if upstream is not None:
                self.forget(channel)  # still connecting: open() sees it closed and drops it
                abort = payload[:1] == b"\x01"
                if isinstance(upstream, Subsystem):
                    upstream.close(abort=abort)
                elif upstream.transport is not None:
                    upstream.transport.abort() if abort else upstream.transport.close()
        elif kind == OPEN_SUBSYSTEM:
            (window,) = struct.unpack(">I", payload[:4])
            name = payload[4:].decode(errors="replace")
            subsystem = Subsystem(self, channel, window)
            self.channels[channel] = subsystem  # at once: DATA and EOF may come before OPEN_OK
            self.loop.create_task(self.start(subsystem, name))
        elif kind == OPEN:
            window, port = struct.unpack(">IH", payload[:6])
            host = payload[6:].decode(errors="replace")
            upstream = Upstream(self, channel, window)
            self.channels[channel] = upstream  # at once: DATA and EOF may come before OPEN_OK
            self.loop.create_task(self.open(upstream, host, port))

    async def open(self, upstream: Upstream, host: str, port: int) -> None:
        channel = upstream.channel
        try:
            family = _literal_family(host)
            if family is not None:  # an address: no getaddrinfo (a thread hop, milliseconds)
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    await self.loop.sock_connect(sock, (host, port))
                except BaseException:
                    sock.close()
                    raise
                await self.loop.create_connection(lambda: upstream, sock=sock)
            else:
                await self.loop.create_connection(lambda: upstream, host, port)
        except socket.gaierror as exc:
            self.fail(channel, FAIL_GAIERROR, exc.errno or socket.EAI_NONAME, str(exc))
            return
        except OSError as exc:
            self.fail(channel, FAIL_OSERROR, exc.errno or errno.EIO, exc.strerror or str(exc))
            return
        assert upstream.transport is not None
        if upstream.closed:  # tpconf gave up on it meanwhile
            upstream.transport.abort()
            return
        sock = upstream.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send(OPEN_OK, channel, struct.pack(">I", WINDOW_SIZE))

    async def start(self, subsystem: Subsystem, name: str) -> None:
        channel = subsystem.channel
        argv = SUBSYSTEMS.get(name)
        if argv is None:
            subsystem.finish()
            self.fail(channel, FAIL_OSERROR, errno.ENOENT, f"no subsystem {name!r}")
            return
        try:
            await self.loop.subprocess_exec(
                lambda: subsystem,
                *argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            subsystem.finish()
            self.fail(channel, FAIL_OSERROR, exc.errno or errno.EIO, exc.strerror or str(exc))
            return
        if subsystem.closed:
            subsystem.close(abort=True)
            return
        self.send(OPEN_OK, channel, struct.pack(">I", WINDOW_SIZE))

    def fail(self, channel: int, kind: int, code: int, text: str) -> None:
        if self.channels.pop(channel, None) is None:
            return  # tpconf gave up on it meanwhile: no answer expected
        payload = struct.pack(">Bh", kind, code) + text.encode()[:200]
        self.send(OPEN_FAIL, channel, payload)

    def forget(self, channel: int) -> None:
        upstream = self.channels.pop(channel, None)
        if upstream is not None:
            upstream.closed = True

    def close_channel(self, channel: int, *, abort: bool) -> None:
        if channel in self.channels:
            self.forget(channel)
            self.send(CLOSE, channel, b"\x01" if abort else b"\x00")

    def send(self, kind: int, channel: int, payload: bytes | memoryview = b"") -> None:
        """Queue a frame: the frames of one event-loop turn leave in one ``writelines`` (one
        ``writev``, payloads not copied) at its end, or at once past :data:`COALESCE` bytes."""
        head = HEADER.pack(kind, channel, len(payload))
        if len(payload) <= 4096:
            self.out.append(head + payload)
        else:
            self.out += (head, payload)
        self.out_size += len(head) + len(payload)
        if self.out_size >= COALESCE:
            self.flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        out, self.out, self.out_size = self.out, [], 0
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def send_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


def _refuse(transport: Any) -> None:
    transport.abort()


class Output(Protocol):
    """Where the port is printed (stdout, or an exec session's stdout in tests)."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


async def serve(
    key: bytes, *, port_out: Output | None = None, stdin_closed: asyncio.Future[None] | None = None
) -> int:
    """Listen, print the port on ``port_out`` (stdout by default), serve one connection until it
    or ``stdin_closed`` ends; the exit code (1: nobody connected in time)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    muxes: list[Mux] = []
    nonce = os.urandom(NONCE)

    servers: list[asyncio.AbstractServer] = []

    def factory() -> Mux:
        mux = Mux(key, nonce, done)
        if muxes:  # one connection only (the listener is closing): refuse at once
            mux.connection_made = _refuse  # type: ignore[method-assign]
        else:
            loop.call_soon(servers[0].close)  # stop listening now: nothing else can connect
        muxes.append(mux)
        return mux

    server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1)
    servers.append(server)
    port = server.sockets[0].getsockname()[1]
    out = port_out if port_out is not None else sys.stdout
    out.write(f"{port}\n")
    out.flush()
    waits: list[asyncio.Future[None]] = [done] + ([stdin_closed] if stdin_closed else [])
    deadline = loop.time() + ACCEPT_TIMEOUT
    while not muxes and loop.time() < deadline and not any(w.done() for w in waits):  # noqa: ASYNC110 (three conditions, one of them a clock)
        await asyncio.sleep(0.005)
    server.close()
    if not muxes:
        return 1
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    transport = muxes[0].transport
    if transport is not None:
        transport.abort()  # the session is over: every channel with it
    await muxes[0].reap(REAP_TIMEOUT)
    return 0


async def _main() -> int:
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.buffer.readline)
    try:
        key = bytes.fromhex(line.decode().strip())
    except ValueError:
        key = b""
    if len(key) < 32:
        sys.stderr.write("tpconf-agent relay: expected a key of 32 bytes (hex) on stdin\n")
        return 2
    stdin_closed: asyncio.Future[None] = loop.create_future()

    def wait_stdin() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the SSH session is gone

    async def watch() -> None:
        await loop.run_in_executor(None, wait_stdin)
        if not stdin_closed.done():
            stdin_closed.set_result(None)

    watcher = loop.create_task(watch())
    try:
        return await serve(key, stdin_closed=stdin_closed)
    finally:
        watcher.cancel()


def main() -> None:
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    code = asyncio.run(_main())
    os._exit(code)  # the stdin reader thread may still block; nothing else is left to do
