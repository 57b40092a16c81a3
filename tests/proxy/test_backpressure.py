"""Backpressure in the SOCKS and DNS servers: a client faster than its peer is slowed down.

Issue 11: anyio's accepted streams kept reading while the destination did not (1.89 GB through
SOCKS from a client that pipelines its request and data), and DNS over TCP started a task per
pipelined query (1.3 GB). A destination that accepts and never reads (or a client that never
reads its replies) is stalled, a writer pushes for two seconds, and the tests assert that it was
blocked after a few MiB (the kernel's buffers and the relay's bounded ones) and that this
process allocated little meanwhile. The same for vpn-tcp's proxy is in
``tests/redirect/test_transparent.py``, for expose in ``tests/tunnel/test_connection.py``, and
through the real cluster in ``tests/e2e/test_memory.py``.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import anyio
import pytest

from tests.load.pressure import (
    MAX_GROWTH,
    MAX_IN_FLIGHT,
    PUSH,
    MiB,
    connect,
    push,
    stalled_server,
    watch_memory,
    writer_socket,
)
from tests.proxy.fakes import HELLO_IP, FakeNameserver, MapDialer
from tpconf.proxy.dnsserver import MAX_TCP_IN_FLIGHT, DnsServer
from tpconf.proxy.resolver import ClusterResolver
from tpconf.proxy.socks import SocksServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def test_a_pipelining_socks_client_is_slowed_down_by_a_destination_that_does_not_read(
    resolver: ClusterResolver, dialer: MapDialer
) -> None:
    async with stalled_server() as port, anyio.create_task_group() as tg:
        dialer.routes[(HELLO_IP, port)] = ("127.0.0.1", port)
        server = SocksServer(resolver, dialer)
        socks_port = await tg.start(server.serve)
        with writer_socket() as sock:
            await connect(sock, socks_port)
            # greeting, CONNECT and data at once, without waiting for the replies
            request = b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton(HELLO_IP)
            sock.sendall(request + port.to_bytes(2, "big"))
            with watch_memory() as memory:
                sent = await push(sock, seconds=2, limit=PUSH)
        tg.cancel_scope.cancel()
    assert (HELLO_IP, port) in dialer.calls
    assert sent < MAX_IN_FLIGHT, f"{sent / MiB:.0f} MiB went into a stalled destination"
    assert memory.peak < MAX_GROWTH, f"{memory.peak / MiB:.1f} MiB allocated"


def _query(qid: int, name: str) -> bytes:
    """A query for ``name``, type A, with its two-byte length (DNS over TCP)."""
    labels = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    data = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + b"\0\1\0\1"
    return len(data).to_bytes(2, "big") + data


async def test_a_dns_client_that_pipelines_without_reading_replies_is_slowed_down(
    resolver: ClusterResolver, nameserver: FakeNameserver
) -> None:
    # Every name is new (no cache), and the nameserver takes its time: answers pile up.
    names = [f"n{i}.default.svc.cluster.local" for i in range(100_000)]
    nameserver.delays = {f"{name}.": 0.2 for name in names}
    queries = b"".join(_query(i & 0xFFFF, name) for i, name in enumerate(names))
    server = DnsServer(resolver, upstream=("127.0.0.1", 9))
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        tasks_before = len(asyncio.all_tasks())
        most_tasks = tasks_before
        with writer_socket() as sock:
            await connect(sock, port)
            sent = 0
            with watch_memory() as memory, anyio.move_on_after(2):
                while sent < len(queries):
                    try:
                        sent += sock.send(queries[sent : sent + 65536])
                    except BlockingIOError:
                        most_tasks = max(most_tasks, len(asyncio.all_tasks()))
                        with anyio.move_on_after(0.05):
                            await anyio.wait_writable(sock)
                most_tasks = max(most_tasks, len(asyncio.all_tasks()))
        tg.cancel_scope.cancel()
    assert sent < len(queries), "every query was taken: nothing slowed the client down"
    # one task per query in flight, and the resolver's own (a query to the nameserver each)
    assert most_tasks - tasks_before <= 3 * MAX_TCP_IN_FLIGHT + 10, most_tasks - tasks_before
    assert memory.peak < MAX_GROWTH, f"{memory.peak / MiB:.1f} MiB allocated"
