"""The seam between the tunnel and its users, and tpconf's own TCP plumbing, bounded.

The proxy, the VPN and the DNS resolver need "a TCP connection to host:port as seen from the
pod", and must not know that an SSH channel provides it (the layers forbid them to import the
tunnel). The tunnel implements :class:`Dialer`; the reconciler hands it to them.

Memory and file descriptors are bounded here, for every local listener (SOCKS, vpn-tcp's
transparent proxy, DNS over TCP):

- :class:`TCPStream`: a stream over an accepted socket that reads only as fast as it is read.
  anyio's ``accept()`` streams keep reading until a ``receive()`` has to wait, so a client that
  sends faster than the other side drains was held in memory whole (issue 11: 5.66 GB in 10 s).
  Per connection it holds at most :data:`READ_LIMIT` plus one socket read (256 KiB) unread, and
  one ``send()`` (a :data:`RELAY_CHUNK`) not yet taken by the kernel.
- :class:`TCPListener`: an accept loop that survives ``EMFILE``, ``ENFILE``, ``ENOBUFS`` and
  ``ENOMEM`` (it backs off and keeps serving: the waiting clients stay in the kernel's backlog),
  and caps the connections it serves at once (past the cap a connection is reset at once). Both
  conditions are logged at most every :data:`LOG_INTERVAL` seconds, with how often they
  recurred. Binding one raises the soft fd limit to the hard one (:func:`raise_fd_limit`).
- :class:`BoundedStream`: what :class:`TCPStream` and the SSH channel streams of
  :mod:`tpconf.tunnel.stream` share: a :class:`ReceiveBuffer` that pauses its source past its
  limit, and a :class:`WriteGate` that holds ``send()`` while the channel below is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, Self

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, SocketAttribute, TaskStatus

log = logging.getLogger(__name__)

#: Bytes asked for per read when relaying: large reads keep per-chunk overhead low in bulk
#: transfers, and a read returns what is there, so small exchanges are not delayed.
RELAY_CHUNK = 256 * 1024

#: Unread bytes of an accepted connection above which tpconf stops reading it (the kernel's
#: buffers and then the client wait). One relay chunk: what the relay asks for in one read.
READ_LIMIT = RELAY_CHUNK

#: Connections one listener serves at once; past this, new ones are reset. Each costs a file
#: descriptor (two when it is relayed to a local port) and about 1 MiB at most in buffers.
MAX_CONNECTIONS = 4096

#: ``accept()`` errors that mean "out of a resource for now": wait and try again.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: ``accept()`` errors that concern only the connection being accepted (gone meanwhile).
_CONNECTION_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})

#: Back-off of the accept loop while out of descriptors: first wait, then doubled up to the last.
#: One of the listener's own connections ending cuts the wait short (it freed a descriptor).
ACCEPT_BACKOFF = (0.01, 0.2)


class Dialer(Protocol):
    """Opens TCP connections from another place (the proxy pod, or locally in tests)."""

    async def dial(self, host: str, port: int) -> ByteStream:
        """Connect to ``host:port``; raises ``OSError`` or a :class:`~tpconf.errors.TunnelError`."""
        ...


async def relay(a: ByteStream, b: ByteStream, *, chunk: int = RELAY_CHUNK) -> None:
    """Copy bytes both ways until both directions have ended (SOCKS, vpn-tcp, sshfs use it).

    An EOF is passed on as an EOF (half-close), not turned into a close: a client that shuts
    down its write side still gets the reply. A broken side (reset, closed) stops both
    directions. The caller closes the streams. Each direction holds one chunk at most: the next
    read waits until the other side has taken the last one.
    """

    async def pump(source: ByteStream, sink: ByteStream) -> None:
        try:
            while True:
                try:
                    data = await source.receive(chunk)
                except anyio.EndOfStream:
                    break
                await sink.send(data)
            await sink.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump, b, a)
        await pump(a, b)  # in this task: one task fewer per connection


class LocalDialer:
    """A :class:`Dialer` that connects from this machine. For tests and for localhost."""

    async def dial(self, host: str, port: int) -> ByteStream:
        return await anyio.connect_tcp(host, port)


# ---- bounded reading ----------------------------------------------------------------------


class Pausable(Protocol):
    """What feeds a :class:`ReceiveBuffer`: an asyncio transport, an SSH channel."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ReceiveBuffer:
    """Bytes a protocol callback received and nobody has read yet, at most about ``limit``.

    The callback side calls :meth:`feed`, :meth:`feed_eof` and :meth:`lose`; the reader calls
    :meth:`receive`. When ``limit`` bytes or more wait, the source is paused; it is resumed once
    the reader has taken the buffer down to half of that (hysteresis: one pause per half limit,
    not one per read). Reads join the chunks that wait, up to ``max_bytes``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._source: Pausable | None = None
        self._chunks: deque[bytes | memoryview] = deque()
        self.buffered = 0
        """Bytes waiting to be read."""
        self._paused = False
        self._eof = False
        self._lost = False
        self._lost_exc: BaseException | None = None
        self._closed = False
        self._readable: anyio.Event | None = None  # while a reader waits

    def attach(self, source: Pausable) -> None:
        """The transport or channel to pause (known only once the connection is made)."""
        self._source = source

    def feed(self, data: bytes | memoryview) -> None:
        """What arrived; a memoryview (of a larger read, no copy yet) is copied once, when read."""
        if self._closed:
            return
        self._chunks.append(data)
        self.buffered += len(data)
        if self.buffered >= self.limit and not self._paused and self._source is not None:
            self._paused = True
            self._source.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def lose(self, exc: BaseException | None) -> None:
        """The connection is gone; ``exc`` says why when it broke (``None``: it just ended)."""
        self._lost = True
        self._lost_exc = exc
        self._wake()

    def close(self) -> None:
        """Our side closed: drop what waits; readers get ``ClosedResourceError``."""
        self._closed = True
        self._chunks.clear()
        self.buffered = 0
        self._wake()

    async def receive(self, max_bytes: int) -> bytes:
        """What waits (up to ``max_bytes``), once there is something; anyio's stream errors.

        Bytes that are already here are returned after a cancellation check only, without a
        turn of the event loop (as asyncio's own streams do): a turn per read and per write
        was part of each connection's CPU in the 1,000-connection row (bench/RESULTS.md). A
        reader still yields whenever it waits, and only the loop's callbacks fill the buffer,
        so a loop of reads cannot keep the others from running.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        if not self._chunks and (self._closed or self._lost or self._eof):
            await anyio.lowlevel.cancel_shielded_checkpoint()  # ending is a scheduling point
        while not self._chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._lost_exc is not None:
                raise anyio.BrokenResourceError from self._lost_exc
            if self._eof or self._lost:
                raise anyio.EndOfStream
            readable = self._readable = anyio.Event()
            await readable.wait()
        data = self._take(max_bytes)
        if self._paused and self.buffered <= self.limit // 2 and self._source is not None:
            self._paused = False
            self._source.resume_reading()  # may feed us at once
        return data

    def _wake(self) -> None:
        # An Event only while a reader waits: most reads find their bytes already here.
        readable, self._readable = self._readable, None
        if readable is not None:
            readable.set()

    def _take(self, max_bytes: int) -> bytes:
        first = self._chunks.popleft()
        if len(first) >= max_bytes:
            if len(first) > max_bytes:
                self._chunks.appendleft(first[max_bytes:])
                first = first[:max_bytes]
            self.buffered -= len(first)
            return first if isinstance(first, bytes) else bytes(first)
        parts = [first]
        size = len(first)
        while self._chunks and size + len(self._chunks[0]) <= max_bytes:
            chunk = self._chunks.popleft()
            parts.append(chunk)
            size += len(chunk)
        self.buffered -= size
        if len(parts) == 1:
            return first if isinstance(first, bytes) else bytes(first)
        return b"".join(parts)


class WriteGate:
    """Waits while the transport below says "pause writing" (its buffer is over the mark)."""

    def __init__(self) -> None:
        self._resumed: anyio.Event | None = None  # an unset Event while paused

    @property
    def paused(self) -> bool:
        return self._resumed is not None

    def pause(self) -> None:
        if self._resumed is None:
            self._resumed = anyio.Event()

    def resume(self) -> None:
        """Resume writers (also when the connection is gone: they then find out why)."""
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.set()

    async def wait(self) -> None:
        """Return once writing is not paused."""
        while self._resumed is not None:
            await self._resumed.wait()


class Channel(Pausable, Protocol):
    """What a :class:`BoundedStream` writes to: an asyncio transport, an SSH channel."""

    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def is_closing(self) -> bool: ...


class BoundedStream(ByteStream):
    """A byte stream over callbacks (asyncio's protocol, asyncssh's session), bounded both ways.

    Reads come from a :class:`ReceiveBuffer` of ``read_limit``; :meth:`send` writes to the
    channel and returns once it stops saying "pause writing". Subclasses route their callbacks
    to :meth:`_connected`, the buffer's ``feed``/``feed_eof``, :meth:`_lose`, and the gate, and
    say in :meth:`_shut` how to close. Used by :class:`TCPStream` and the tunnel's channels.
    """

    def __init__(self, *, read_limit: int) -> None:
        self._buffer = ReceiveBuffer(read_limit)
        self._gate = WriteGate()
        self._channel: Channel | None = None
        self._eof_sent = False
        self._lost = False
        self._lost_exc: BaseException | None = None
        self._closed = False

    def _connected(self, channel: Channel) -> None:
        self._channel = channel
        self._buffer.attach(channel)

    def _lose(self, exc: BaseException | None) -> None:
        self._lost = True
        self._lost_exc = exc
        self._buffer.lose(exc)
        self._gate.resume()

    def _shut(self) -> None:
        """Close the channel (once, on :meth:`aclose`)."""
        raise NotImplementedError

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet (the read limit, and what one callback delivers)."""
        return self._buffer.buffered

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._buffer.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        """Write ``item``; returns once the channel below takes more (a cancellation check
        only, when it does at once: see :meth:`ReceiveBuffer.receive`)."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        channel = self._check_send()
        if not item:
            return
        try:
            channel.write(item)
        except OSError as exc:
            raise anyio.BrokenResourceError from exc
        await self._gate.wait()
        self._check_send()

    async def send_eof(self) -> None:
        await anyio.lowlevel.checkpoint()
        channel = self._check_send()
        self._eof_sent = True
        try:
            channel.write_eof()
        except OSError as exc:
            raise anyio.BrokenResourceError from exc

    def _check_send(self) -> Channel:
        if self._closed or self._eof_sent:
            raise anyio.ClosedResourceError
        if self._lost or self._channel is None or self._channel.is_closing():
            raise anyio.BrokenResourceError from self._lost_exc
        return self._channel

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._buffer.close()
            self._shut()
            self._gate.resume()
        await anyio.lowlevel.checkpoint()


# ---- accepted TCP connections -------------------------------------------------------------


class _Protocol(asyncio.Protocol):
    def __init__(self, stream: TCPStream) -> None:
        self.stream = stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # Nothing waits in our buffer once send() returns: the kernel's buffer is the only one.
        transport.set_write_buffer_limits(high=0)
        self.stream._transport = transport
        self.stream._connected(transport)

    def data_received(self, data: bytes) -> None:
        self.stream._buffer.feed(data)

    def eof_received(self) -> bool:
        self.stream._buffer.feed_eof()
        return True  # keep our side open for sending: TCP half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream._lose(exc)

    def pause_writing(self) -> None:
        self.stream._gate.pause()

    def resume_writing(self) -> None:
        self.stream._gate.resume()


class TCPStream(BoundedStream):
    """A connected TCP socket as an anyio byte stream, reading only as fast as it is read.

    Make one with :meth:`wrap` (it takes the socket over). ``extra(SocketAttribute.raw_socket)``
    is the socket itself (for ``SO_ORIGINAL_DST``, ``SO_LINGER``).
    """

    def __init__(self, sock: socket.socket, *, read_limit: int = READ_LIMIT) -> None:
        super().__init__(read_limit=read_limit)
        self._sock = sock
        self._transport: asyncio.Transport | None = None

    @classmethod
    async def wrap(cls, sock: socket.socket, *, read_limit: int = READ_LIMIT) -> TCPStream:
        """A stream over ``sock`` (connected; made non-blocking here). Closes it on failure."""
        stream = cls(sock, read_limit=read_limit)
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop = asyncio.get_running_loop()
            await loop.connect_accepted_socket(lambda: _Protocol(stream), sock)
        except BaseException:
            sock.close()
            raise
        return stream

    def _shut(self) -> None:
        transport = self._transport
        if transport is None:
            self._sock.close()
        elif transport.get_write_buffer_size():
            transport.abort()  # bytes of a cancelled send(): never linger for them
        else:
            transport.close()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        sock = self._sock
        attributes: dict[Any, Callable[[], Any]] = {
            SocketAttribute.raw_socket: lambda: sock,
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.local_address: lambda: sock.getsockname(),
            SocketAttribute.remote_address: lambda: sock.getpeername(),
        }
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attributes[SocketAttribute.local_port] = lambda: sock.getsockname()[1]
            attributes[SocketAttribute.remote_port] = lambda: sock.getpeername()[1]
        return attributes


# ---- listening ----------------------------------------------------------------------------


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit of open files to the hard one; return the (soft, hard) in force.

    Every relayed connection costs a descriptor, and the usual soft limit (1024) ends a busy
    listener in seconds while the hard one is far higher. Processes tpconf starts inherit it.
    """
    import resource  # POSIX only, like the rest of tpconf

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.debug("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)
        else:
            log.debug("open file limit raised from %d to %d", soft, hard)
            soft = hard
    return soft, hard


def set_reset_on_close(sock: socket.socket) -> None:
    """Make the coming close of ``sock`` send a RST: the client sees "connection reset" at once,
    like a refusal, instead of an orderly end it could mistake for an answer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


Handler = Callable[[TCPStream], Awaitable[None]]

#: A condition that keeps recurring (out of descriptors, at the connection cap) is logged at
#: most once per this many seconds, with how often it happened meanwhile.
LOG_INTERVAL = 10.0


class _EveryFewSeconds:
    """Says when a recurring warning is due again, and counts the times it was not."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last = -math.inf
        self._skipped = 0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._skipped += 1
            return False
        self._last = now
        return True

    def since(self) -> str:
        """The count of the times not logged, for the line being logged; resets it."""
        skipped, self._skipped = self._skipped, 0
        return f", {skipped} more times since the last such line" if skipped else ""


class TCPListener:
    """A listening TCP socket whose accept loop outlives fd exhaustion and caps its connections.

    ``name`` says what it serves in log lines (``"SOCKS"``). Bind with :meth:`bind`, then
    :meth:`serve` until cancelled. ``max_connections`` bounds the connections served at once;
    one more is reset as soon as it is accepted (the client sees ``ECONNRESET``). ``read_limit`` bounds each connection's unread bytes (:class:`TCPStream`).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str,
        max_connections: int = MAX_CONNECTIONS,
        read_limit: int = READ_LIMIT,
    ) -> None:
        self._sock = sock
        self.name = name
        self.max_connections = max_connections
        self.read_limit = read_limit
        self.active = 0
        """Connections being served now."""
        self.refused = 0
        """Connections reset because :attr:`max_connections` were being served."""
        self.exhausted = 0
        """Times ``accept()`` found no descriptor (or buffer) left and backed off."""
        self._refusals_log = _EveryFewSeconds()
        self._exhausted_log = _EveryFewSeconds()
        self._freed = anyio.Event()  # set when one of our connections ends

    @classmethod
    def bind(
        cls,
        host: str,
        port: int,
        *,
        name: str,
        max_connections: int = MAX_CONNECTIONS,
        read_limit: int = READ_LIMIT,
        backlog: int = 4096,
    ) -> TCPListener:
        """Listen on ``host:port`` (0: any free port). Raises ``OSError`` when it cannot."""
        raise_fd_limit()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock, name=name, max_connections=max_connections, read_limit=read_limit)

    @property
    def port(self) -> int:
        port: int = self._sock.getsockname()[1]
        return port

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    async def serve(
        self, handler: Handler, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept and run ``handler`` on each connection (the stream is closed after it) until
        cancelled. A handler's exception ends its connection only (logged at debug)."""
        async with anyio.create_task_group() as tg:
            task_status.started(self.port)
            backoff = ACCEPT_BACKOFF[0]
            while True:
                conn = await self._accept()
                if conn is None:
                    self._freed = anyio.Event()
                    with anyio.move_on_after(backoff):
                        await self._freed.wait()
                    backoff = min(backoff * 2, ACCEPT_BACKOFF[1])
                    continue
                backoff = ACCEPT_BACKOFF[0]
                if self.active >= self.max_connections:
                    self._refuse(conn)
                    continue
                self.active += 1
                tg.start_soon(self._run, handler, conn)

    async def _accept(self) -> socket.socket | None:
        """The next connection; ``None`` when out of descriptors (the caller backs off).

        Accepts at once while connections wait in the backlog, and waits for readability only
        when none does: a burst of 1,000 connects is taken in one go instead of one event-loop
        turn each (the 1,000-connection row of bench/RESULTS.md)."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue  # nothing waited (or another process took it): wait, then try again
            except OSError as exc:
                if exc.errno in _CONNECTION_GONE:
                    continue
                if exc.errno not in _EXHAUSTED:
                    raise
                self.exhausted += 1
                if self._exhausted_log.due():
                    log.warning(
                        "%s: cannot accept connections: %s (%d served now%s); the clients wait "
                        "until some end. Raise the open file limit (`ulimit -n`) if this lasts",
                        self.name,
                        exc.strerror or exc,
                        self.active,
                        self._exhausted_log.since(),
                    )
                return None
            return conn

    def _refuse(self, conn: socket.socket) -> None:
        self.refused += 1
        set_reset_on_close(conn)
        conn.close()
        if self._refusals_log.due():
            log.warning(
                "%s: %d connections at once, the most one listener serves: new ones are "
                "refused until some end (%d refused so far%s)",
                self.name,
                self.max_connections,
                self.refused,
                self._refusals_log.since(),
            )

    async def _run(self, handler: Handler, conn: socket.socket) -> None:
        try:
            stream = await TCPStream.wrap(conn, read_limit=self.read_limit)
        except OSError as exc:
            log.debug("%s: connection lost before it was served: %s", self.name, exc)
            self._ended()
            return
        try:
            async with stream:
                await handler(stream)
        except Exception:  # one connection's trouble never stops the listener
            log.debug("%s: connection failed", self.name, exc_info=True)
        finally:
            self._ended()

    def _ended(self) -> None:
        self.active -= 1
        self._freed.set()
