"""tpconf.net: the bounded stream over accepted sockets and the listener, on real loopback.

The load tests (``tests/load/``) push these through the SOCKS server, DNS and vpn-tcp; here are
the stream's own promises: bytes that arrived before anyone read are held up to the limit only,
nothing is lost or reordered, half-close works both ways, and the socket's attributes are there.
"""

from __future__ import annotations

import resource
import socket
from collections.abc import AsyncIterator

import anyio
import pytest
from anyio.abc import SocketAttribute

from tests.load.pressure import MiB, push
from tpconf.net import READ_LIMIT, TCPListener, TCPStream, raise_fd_limit

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]


async def accepted_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of plain sockets: (client, the server's accepted one)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


@pytest.fixture
async def pair() -> AsyncIterator[tuple[socket.socket, TCPStream]]:
    client, server = await accepted_pair()
    with client:
        client.setblocking(False)
        stream = await TCPStream.wrap(server)
        async with stream:
            yield client, stream


async def test_bytes_sent_before_the_first_read_are_held_up_to_the_limit_and_none_lost(
    pair: tuple[socket.socket, TCPStream],
) -> None:
    client, stream = pair
    sent = await push(client, seconds=0.5, limit=256 * MiB)  # nobody reads meanwhile
    await anyio.sleep(0.1)
    # the limit, and at most one socket read (256 KiB) that arrived just before the pause
    assert stream.buffered <= READ_LIMIT + 256 * 1024
    assert sent < 128 * MiB  # the writer was held up by the kernel's buffers
    client.shutdown(socket.SHUT_WR)
    received = 0
    with anyio.fail_after(10):
        while True:
            try:
                received += len(await stream.receive(1 << 20))
            except anyio.EndOfStream:
                break
            assert stream.buffered <= READ_LIMIT + 256 * 1024
    assert received == sent


async def test_half_close_passes_both_ways_and_the_socket_is_reachable(
    pair: tuple[socket.socket, TCPStream],
) -> None:
    client, stream = pair
    assert stream.extra(SocketAttribute.remote_port) == client.getsockname()[1]
    assert stream.extra(SocketAttribute.raw_socket).fileno() > 0
    client.setblocking(True)
    client.sendall(b"question")
    client.shutdown(socket.SHUT_WR)
    with anyio.fail_after(5):
        assert await stream.receive() == b"question"
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
    await stream.send(b"answer after your EOF")
    await stream.send_eof()
    assert client.recv(100) == b"answer after your EOF"
    assert client.recv(100) == b""
    with pytest.raises(anyio.ClosedResourceError):
        await stream.send(b"after EOF")


async def test_a_reset_by_the_peer_is_a_broken_stream_and_a_closed_one_refuses_reads(
    pair: tuple[socket.socket, TCPStream],
) -> None:
    client, stream = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    client.close()  # RST
    with anyio.fail_after(5), pytest.raises(anyio.BrokenResourceError):
        await stream.receive()
    await stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.receive()


async def test_a_handler_that_fails_ends_its_connection_only() -> None:
    async def handler(stream: TCPStream) -> None:
        data = await stream.receive()
        if data == b"fail":
            raise RuntimeError("this connection's trouble")
        await stream.send(b"ok " + data)

    async with (
        TCPListener.bind("127.0.0.1", 0, name="test") as listener,
        anyio.create_task_group() as tg,
    ):
        port = await tg.start(listener.serve, handler)
        for message in (b"fail", b"again"):
            async with await anyio.connect_tcp("127.0.0.1", port) as conn:
                await conn.send(message)
                with anyio.fail_after(5):
                    reply = b"".join([chunk async for chunk in conn])
                assert reply == (b"" if message == b"fail" else b"ok again")
        assert listener.active == 0
        tg.cancel_scope.cancel()


def test_the_soft_fd_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_fd_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def buffered(stream: TCPStream, size: int) -> None:
    """Until ``size`` bytes wait unread in ``stream`` (only a read would be an event)."""
    with anyio.fail_after(5):
        while stream.buffered < size:  # noqa: ASYNC110 (polls without reading)
            await anyio.sleep(0.01)


async def test_a_read_of_waiting_bytes_is_still_a_cancellation_point(
    pair: tuple[socket.socket, TCPStream],
) -> None:
    client, stream = pair
    client.send(b"waiting")
    await buffered(stream, len(b"waiting"))
    with anyio.CancelScope() as scope:
        scope.cancel()
        await stream.receive()  # bytes are there, but the scope is cancelled: no read
    assert scope.cancelled_caught
    assert await stream.receive() == b"waiting"  # nothing was taken by the cancelled read


async def test_reads_of_waiting_bytes_do_not_wait_for_a_turn_of_the_loop(
    pair: tuple[socket.socket, TCPStream],
) -> None:
    """Bytes already here are returned without yielding; a reader yields only to wait (and
    then another task runs meanwhile)."""
    client, stream = pair
    client.send(b"x" * 3)
    await buffered(stream, 3)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(count_turns)
        await anyio.lowlevel.checkpoint()  # let it start
        before = turns
        for _ in range(3):
            assert await stream.receive(1) == b"x"
        assert turns == before  # three reads, no turn of the loop
        client.send(b"y")
        assert await stream.receive(1) == b"y"  # had to wait: the other task ran meanwhile
        assert turns > before
        tg.cancel_scope.cancel()
