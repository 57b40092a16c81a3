"""One SSH channel as an anyio :class:`~anyio.abc.ByteStream`.

asyncssh calls the session callbacks (``data_received``, ``eof_received``, ``pause_writing``…) on
the event loop; :class:`ChannelStream` buffers what arrives and hands it out in reads of up to
``max_bytes`` (64 KiB by default), joining the SSH packets (32 KiB at most) that are waiting.

Flow control both ways: when more than ``read_limit`` bytes wait unread, the channel stops
reading, so the SSH window is not re-opened and the far end slows down; :meth:`send` returns
only once asyncssh's send buffer is below its high-water mark.

TCP half-close: the remote EOF keeps the channel open for sending (``eof_received`` returns
``True``), and :meth:`send_eof` sends EOF while replies can still arrive.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio
import anyio.lowlevel
import asyncssh
from anyio.abc import ByteStream
from asyncssh.channel import SSHChannel

#: Unread bytes above which the channel stops reading (back-pressure to the sender); half the
#: default channel window (see ``TunnelSettings.read_limit``).
DEFAULT_READ_LIMIT = 4 * 1024 * 1024


class ChannelStream(ByteStream):
    """A byte stream over one SSH channel; the session object asyncssh calls back."""

    def __init__(self, *, read_limit: int = DEFAULT_READ_LIMIT) -> None:
        self._chan: SSHChannel[bytes] | None = None
        self._read_limit = read_limit
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._reading_paused = False
        self._eof_received = False
        self._eof_sent = False
        self._lost = False
        self._lost_exc: BaseException | None = None
        self._closed = False
        self._readable = anyio.Event()
        self._writable: anyio.Event | None = None  # an unset Event while asyncssh pauses us

    # ---- asyncssh session callbacks -------------------------------------------------------

    def connection_made(self, chan: Any) -> None:
        self._chan = chan

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype is not None:  # stderr of a subsystem session: not part of the stream
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= self._read_limit and not self._reading_paused and self._chan:
            self._reading_paused = True
            self._chan.pause_reading()
        self._readable.set()

    def eof_received(self) -> bool:
        self._eof_received = True
        self._readable.set()
        return True  # keep the channel open for our side: TCP half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._lost_exc = exc
        self._readable.set()
        self._wake_writers()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = anyio.Event()

    def resume_writing(self) -> None:
        self._wake_writers()

    def _wake_writers(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None:
            writable.set()

    # ---- anyio ByteStream -----------------------------------------------------------------

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        while not self._chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._lost_exc is not None:
                raise anyio.BrokenResourceError from self._lost_exc
            if self._eof_received or self._lost:
                raise anyio.EndOfStream
            self._readable = anyio.Event()
            await self._readable.wait()
        data = self._take(max_bytes)
        if self._reading_paused and self._buffered <= self._read_limit // 2 and self._chan:
            self._reading_paused = False
            self._chan.resume_reading()  # may call data_received at once
        return data

    def _take(self, max_bytes: int) -> bytes:
        first = self._chunks.popleft()
        if len(first) >= max_bytes:
            if len(first) > max_bytes:
                self._chunks.appendleft(first[max_bytes:])
                first = first[:max_bytes]
            self._buffered -= len(first)
            return first
        parts = [first]
        size = len(first)
        while self._chunks and size + len(self._chunks[0]) <= max_bytes:
            chunk = self._chunks.popleft()
            parts.append(chunk)
            size += len(chunk)
        self._buffered -= size
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        chan = self._check_send()
        if not item:
            return
        try:
            chan.write(item)
        except OSError as exc:
            raise anyio.BrokenResourceError from exc
        while self._writable is not None:
            await self._writable.wait()
            self._check_send()

    async def send_eof(self) -> None:
        await anyio.lowlevel.checkpoint()
        chan = self._check_send()
        self._eof_sent = True
        try:
            chan.write_eof()
        except OSError as exc:
            raise anyio.BrokenResourceError from exc

    def _check_send(self) -> SSHChannel[bytes]:
        if self._closed or self._eof_sent:
            raise anyio.ClosedResourceError
        if self._lost or self._chan is None:
            raise anyio.BrokenResourceError from self._lost_exc
        return self._chan

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._chunks.clear()
            self._buffered = 0
            if self._chan is not None and not self._lost:
                self._chan.close()  # sends what is buffered, then CHANNEL_CLOSE
            self._readable.set()
            self._wake_writers()
        await anyio.lowlevel.checkpoint()


class TCPChannelStream(ChannelStream, asyncssh.SSHTCPSession[bytes]):
    """A ``direct-tcpip`` channel: an outbound TCP connection made by the agent."""


class SubsystemStream(ChannelStream, asyncssh.SSHClientSession[bytes]):
    """A session channel running a subsystem (``sftp``): its stdin and stdout as one stream.

    Its stderr is dropped; the exit status is not reported (sftp-server exits when the stream
    closes).
    """
