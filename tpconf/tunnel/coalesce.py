"""The SSH connection's byte path, with the packets of one event-loop turn written at once.

asyncssh encrypts and writes every SSH packet with its own ``transport.write()``: one ``send()``
per packet of 32 KiB at most. Behind us sits ``kubectl port-forward``, then the apiserver, the
kubelet and the container runtime, and each of them wakes up per ``send()``: on the bench's
2-core cluster the kube chain spent 2.6 CPU s per 100 MB through the tunnel instead of 0.9 s
through a bare port-forward, and the ``send`` syscall was the largest item in tpconf's own
profile (bench/RESULTS.md, "Where the time goes").

:class:`CoalescingTransport` sits between asyncssh and the socket transport: a ``write`` only
queues the packet, and the packets queued in one turn of the event loop leave in one
``writelines`` at the start of the next turn (a 256 KiB channel write: one ``send()`` instead of
eight). Nothing else changes:

- **order**: packets leave in the order written; ``close``, ``abort`` and ``write_eof`` first
  hand over what is queued, so a final ``MSG_DISCONNECT`` still goes out (asyncssh schedules
  ``abort`` with ``call_soon`` after it, behind our flush);
- **bounded**: the queue is handed to the socket transport every turn, and at once when it
  reaches :data:`MAX_COALESCE` bytes, so it never holds more than one turn's packets; what the
  socket cannot take yet waits in the socket transport's own buffer, as before;
- **flow control**: the socket transport's ``pause_writing``/``resume_writing`` reach asyncssh's
  protocol unchanged, and :meth:`CoalescingTransport.get_write_buffer_size` counts the queue.
  (asyncssh 2.x ignores them at the connection level; what bounds the bytes in flight is each
  channel's SSH window, which the peer only re-opens as it consumes: a slow peer slows the
  sender through the window, see :mod:`tpconf.tunnel.stream`.)

asyncssh takes this through its public ``tunnel=`` option (:class:`CoalescingConnector`): it
hands us its protocol factory, we open the TCP connection (or adopt the connected socket) and
give its protocol the wrapped transport.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, Protocol

#: Queued bytes at which a write is handed to the socket at once instead of at the end of the
#: turn. Larger turns gain nothing (kubectl reads 32 KiB at a time), and this bounds the queue.
MAX_COALESCE = 1024 * 1024


class CoalescingTransport(asyncio.Transport):
    """A transport whose ``write`` calls of one loop turn reach ``transport`` as one write."""

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: asyncio.BaseProtocol,
        *,
        max_coalesce: int = MAX_COALESCE,
    ) -> None:
        super().__init__()
        self._transport = transport
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._max_coalesce = max_coalesce
        self._queue: list[bytes] = []
        self._queued = 0
        self._flush_scheduled = False
        self._closing = False
        self._eof = False

    # ---- writing --------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise RuntimeError("write() after write_eof()")
        if not data or self._closing:
            return  # like asyncio's transports: dropped once closing
        chunk = data if isinstance(data, bytes) else bytes(data)  # the caller may reuse a buffer
        self._queue.append(chunk)
        self._queued += len(chunk)
        if self._queued >= self._max_coalesce:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        """Hand everything queued to the socket transport, in one call."""
        if not self._queue:
            return
        queue, self._queue, self._queued = self._queue, [], 0
        if self._transport.is_closing():
            return  # the socket is gone (or going): asyncio would drop these too
        if len(queue) == 1:
            self._transport.write(queue[0])
        else:
            self._transport.writelines(queue)  # one send (sendmsg on Python 3.12+)

    def write_eof(self) -> None:
        if self._eof:
            return
        self._flush()
        self._eof = True
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._queued + self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    # ---- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Hand over what is queued, then close (the socket transport drains its buffer first)."""
        if not self._closing:
            self._flush()
            self._closing = True
        self._transport.close()

    def abort(self) -> None:
        """Hand over what is queued (each ``write`` used to be tried at once), then drop the
        connection; what the socket has not taken is lost, as with any ``abort``."""
        if not self._closing:
            self._flush()
            self._closing = True
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def _connection_lost(self) -> None:
        self._closing = True
        self._queue, self._queued = [], 0

    # ---- the rest is the socket transport's -----------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol


class CoalescingProtocol(asyncio.Protocol):
    """The socket transport's protocol: gives ``inner`` a :class:`CoalescingTransport` and
    passes every callback (data, EOF, loss, ``pause_writing``/``resume_writing``) on to it."""

    def __init__(self, inner: asyncio.Protocol, *, max_coalesce: int = MAX_COALESCE) -> None:
        self.inner = inner
        self._max_coalesce = max_coalesce
        self._wrapper: CoalescingTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._wrapper = CoalescingTransport(transport, self.inner, max_coalesce=self._max_coalesce)
        self.inner.connection_made(self._wrapper)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._wrapper is not None:
            self._wrapper._connection_lost()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class PortOpener(Protocol):
    """Opens a connection to a port of the pod (:class:`tpconf.tunnel.spdy.SpdyConnection`)."""

    def open_port(
        self, port: int, protocol_factory: Callable[[], asyncio.Protocol]
    ) -> tuple[asyncio.Transport, asyncio.Protocol]: ...


class CoalescingConnector:
    """asyncssh's ``tunnel=`` object: opens the byte path to sshd under a coalescing transport.

    ``sock``: adopt this connected socket instead of connecting to the host and port asyncssh
    passes (which are then nominal: the host key is pinned by key, not by name). ``link``: open
    a port-forward stream to that port of the pod instead (in-process port-forward).
    ``max_coalesce`` 0 hands every write over at once (no coalescing).
    """

    def __init__(
        self,
        *,
        sock: socket.socket | None = None,
        link: PortOpener | None = None,
        max_coalesce: int = MAX_COALESCE,
    ) -> None:
        self._sock = sock
        self._link = link
        self._max_coalesce = max_coalesce

    async def create_connection(
        self, session_factory: Any, remote_host: str, remote_port: int
    ) -> tuple[asyncio.Transport, Any]:
        loop = asyncio.get_running_loop()

        def factory() -> CoalescingProtocol:
            return CoalescingProtocol(session_factory(), max_coalesce=self._max_coalesce)

        if self._link is not None:
            stream, wrapper = self._link.open_port(remote_port, factory)
            assert isinstance(wrapper, CoalescingProtocol)
            return stream, wrapper.inner
        if self._sock is not None:
            transport, protocol = await loop.create_connection(factory, sock=self._sock)
        else:
            transport, protocol = await loop.create_connection(factory, remote_host, remote_port)
        return transport, protocol.inner

    def close(self) -> None:
        """Part of asyncssh's tunnel protocol; the connection owns the socket."""

    async def wait_closed(self) -> None:
        """Part of asyncssh's tunnel protocol; the connection owns the socket."""
