"""Tools of the load tests: a destination that never reads, a writer that pushes all it can,
and a watch on the memory Python allocates meanwhile.

A relay without backpressure reads a fast writer whole while its destination is stalled; with
backpressure the writer blocks once the kernel's buffers on the way are full, and the relay
holds a bounded amount. The tests assert both: how far the writer got, and how much memory the
process allocated (``tracemalloc``: every ``bytes`` a relay holds is a Python allocation).
"""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import anyio

MiB = 1024 * 1024

#: What a writer may push into a stalled path: the kernel buffers of four sockets (some grow by
#: themselves on loopback) and the relay's own bounded buffers. Without backpressure it is
#: whatever loopback carries in two seconds: gigabytes.
MAX_IN_FLIGHT = 64 * MiB
#: What the process may allocate meanwhile (relay buffers, a few reads of 256 KiB).
MAX_GROWTH = 16 * MiB
#: What the writers try to push.
PUSH = 1024 * MiB

#: Kernel buffer size of the test's own sockets (the stalled server's and the writer's), so
#: that what the writer manages to send measures the relay's buffers, not the kernel's.
SMALL_BUFFER = 64 * 1024


@asynccontextmanager
async def stalled_server() -> AsyncIterator[int]:
    """A loopback TCP server that accepts connections and never reads them; yields its port."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)  # accepted ones too
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.setblocking(False)
    accepted: list[socket.socket] = []

    async def accept() -> None:
        while True:
            await anyio.wait_readable(listener)
            try:
                accepted.append(listener.accept()[0])
            except BlockingIOError:
                continue

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept)
            yield listener.getsockname()[1]
            tg.cancel_scope.cancel()
    finally:
        for conn in accepted:
            conn.close()
        listener.close()


def writer_socket() -> socket.socket:
    """A non-blocking TCP socket with a small send buffer (see :data:`SMALL_BUFFER`)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    return sock


async def connect(sock: socket.socket, port: int) -> None:
    sock.setblocking(False)
    try:
        sock.connect(("127.0.0.1", port))
    except BlockingIOError:
        await anyio.wait_writable(sock)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, "connect failed")


async def push(sock: socket.socket, *, seconds: float, limit: int) -> int:
    """Send as much as ``sock`` takes in ``seconds`` (``limit`` bytes at most); how much."""
    sock.setblocking(False)
    block = memoryview(bytes(MiB))  # one buffer, reused: the writer allocates nothing
    sent = 0
    with anyio.move_on_after(seconds):
        while sent < limit:
            try:
                sent += sock.send(block[: min(MiB, limit - sent)])
            except BlockingIOError:
                await anyio.wait_writable(sock)
    return sent


@dataclass
class MemoryWatch:
    """Python allocations since the watch started: :attr:`peak` is the highest growth seen."""

    baseline: int = 0
    final: int | None = None

    @property
    def peak(self) -> int:
        if self.final is not None:
            return self.final
        return tracemalloc.get_traced_memory()[1] - self.baseline


@contextmanager
def watch_memory() -> Iterator[MemoryWatch]:
    """Trace allocations (tracemalloc) for the duration; yields the watch."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    watch = MemoryWatch(tracemalloc.get_traced_memory()[0])
    try:
        yield watch
    finally:
        watch.final = watch.peak
        if started:
            tracemalloc.stop()
