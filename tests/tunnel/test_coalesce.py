"""SSH packet writes of one event-loop turn leave in one socket write (tpconf.tunnel.coalesce).

Order, close/abort/EOF, the queue bound and flow control against a recording transport and
real sockets; then through ``open_tunnel`` against the in-process agent server, including a
socketpair endpoint (the ``kubernetes`` client's port-forward socket has no peer name). The
loopback throughput with and without coalescing is measured by ``python -m bench --only loopback``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import anyio
import pytest

from tpconf.tunnel import ProxyKeys, Tunnel, open_tunnel
from tpconf.tunnel.coalesce import CoalescingProtocol, CoalescingTransport

from .peers import agent_server, tcp_server

pytestmark = pytest.mark.anyio

USER = "agent"


class Recorder(asyncio.Transport):
    """A socket transport stand-in that records what reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, list_of_data: Any) -> None:
        self.calls.append(("writelines", [bytes(d) for d in list_of_data]))

    def write_eof(self) -> None:
        self.calls.append(("write_eof", None))

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", None))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def written(self) -> bytes:
        out = b""
        for name, arg in self.calls:
            if name == "write":
                out += arg
            elif name == "writelines":
                out += b"".join(arg)
        return out


def _wrap(limit: int = 1024 * 1024) -> tuple[CoalescingTransport, Recorder]:
    recorder = Recorder()
    return CoalescingTransport(recorder, asyncio.Protocol(), max_coalesce=limit), recorder


async def _next_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_turn_reach_the_socket_as_one_call_in_order() -> None:
    wrapper, recorder = _wrap()
    packets = [bytes([n]) * 1000 for n in range(8)]
    for packet in packets:
        wrapper.write(packet)
    assert recorder.calls == []  # queued until the end of the turn
    assert wrapper.get_write_buffer_size() == 8000
    await _next_turn()
    assert recorder.calls == [("writelines", packets)]
    assert wrapper.get_write_buffer_size() == 0
    wrapper.write(b"next turn")
    await _next_turn()
    assert recorder.calls[1:] == [("write", b"next turn")]


async def test_a_reused_buffer_is_copied_when_queued() -> None:
    wrapper, recorder = _wrap()
    buffer = bytearray(b"first")
    wrapper.write(buffer)
    buffer[:] = b"XXXXX"
    wrapper.write(memoryview(b"second"))
    await _next_turn()
    assert recorder.written() == b"firstsecond"


async def test_the_queue_is_bounded_a_full_queue_is_written_at_once() -> None:
    wrapper, recorder = _wrap(limit=10_000)
    for _ in range(25):
        wrapper.write(b"x" * 1000)
        assert wrapper.get_write_buffer_size() < 10_000
    assert [name for name, _ in recorder.calls] == ["writelines", "writelines"]
    await _next_turn()
    assert recorder.written() == b"x" * 25_000


async def test_limit_zero_writes_every_packet_at_once() -> None:
    wrapper, recorder = _wrap(limit=0)
    wrapper.write(b"a")
    wrapper.write(b"b")
    assert recorder.calls == [("write", b"a"), ("write", b"b")]


@pytest.mark.parametrize("ending", ["close", "abort", "write_eof"])
async def test_close_abort_and_eof_hand_over_the_queue_first(ending: str) -> None:
    wrapper, recorder = _wrap()
    wrapper.write(b"disconnect")
    wrapper.write(b" packet")
    getattr(wrapper, ending)()
    assert recorder.calls == [("writelines", [b"disconnect", b" packet"]), (ending, None)]
    await _next_turn()
    assert len(recorder.calls) == 2  # the scheduled flush finds nothing left


async def test_writes_after_close_are_dropped_and_after_eof_refused() -> None:
    wrapper, recorder = _wrap()
    wrapper.close()
    wrapper.write(b"late")
    await _next_turn()
    assert recorder.calls == [("close", None)] and wrapper.is_closing()

    wrapper, recorder = _wrap()
    wrapper.write_eof()
    with pytest.raises(RuntimeError):
        wrapper.write(b"after eof")


async def test_a_socket_closed_under_a_queued_write_drops_it() -> None:
    wrapper, recorder = _wrap()
    wrapper.write(b"doomed")
    recorder.closing = True  # the socket transport is going away (connection lost)
    await _next_turn()
    assert recorder.calls == []


class Inner(asyncio.Protocol):
    """What asyncssh's connection would be: records the callbacks it gets."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.events: list[str] = []
        self.data = b""
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.events.append("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set()

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


async def _over_socketpair() -> tuple[Inner, socket.socket]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    inner = Inner()
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: CoalescingProtocol(inner), sock=ours)
    assert isinstance(inner.transport, CoalescingTransport)
    return inner, theirs


async def test_a_slow_peer_pauses_the_writer_and_resumes_it_when_it_reads() -> None:
    inner, theirs = await _over_socketpair()
    assert inner.transport is not None
    payload = bytes(range(256)) * 4096  # 1 MiB per turn
    loop = asyncio.get_running_loop()
    with theirs:
        for _ in range(8):  # nobody reads: the socket fills, asyncio buffers, then pauses us
            inner.transport.write(payload)
            await _next_turn()
        assert inner.events == ["pause"]
        received = bytearray()
        while len(received) < 8 * len(payload):
            received += await loop.sock_recv(theirs, 1024 * 1024)
        assert inner.events == ["pause", "resume"]
        assert received == payload * 8  # in order, nothing lost or doubled
        await loop.sock_sendall(theirs, b"reply")
        theirs.shutdown(socket.SHUT_WR)
        with anyio.fail_after(5):
            await inner.lost.wait()
    assert inner.data == b"reply"
    assert inner.events[2:] == ["eof", "lost"]
    inner.transport.write(b"after the end")  # dropped quietly, as asyncio does


# ---- through open_tunnel, against the in-process agent server ----------------------------


def _socket_writes(tunnel: Tunnel) -> list[int]:
    """Count, from now on, the calls that reach the tunnel's socket transport."""
    wrapper = tunnel._conn._transport
    assert isinstance(wrapper, CoalescingTransport)
    socket_transport: Any = wrapper._transport
    counter = [0]
    write, writelines = socket_transport.write, socket_transport.writelines

    def counted_write(data: Any) -> None:
        counter[0] += 1
        write(data)

    def counted_writelines(data: Any) -> None:
        counter[0] += 1
        writelines(data)

    socket_transport.write = counted_write
    socket_transport.writelines = counted_writelines
    return counter


async def test_a_large_channel_write_leaves_in_a_few_socket_writes(keys: ProxyKeys) -> None:
    async with (
        agent_server(keys) as agent,
        open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER)) as tunnel,
        tcp_server("sink") as port,
        await tunnel.dial("127.0.0.1", port) as stream,
    ):
        writes = _socket_writes(tunnel)
        await stream.send(bytes(1024 * 1024))  # 32 SSH packets of 32 KiB, in one turn
        await stream.send_eof()
        with anyio.fail_after(5):
            count = int.from_bytes(await stream.receive(), "big")
        assert count == 1024 * 1024
        assert writes[0] <= 6  # 1 MiB of packets, then EOF and window adjusts


async def test_a_socketpair_endpoint_without_a_peer_name_works(keys: ProxyKeys) -> None:
    ours, theirs = socket.socketpair()  # like the kubernetes client's port-forward socket
    assert not ours.getpeername()
    async with agent_server(keys) as agent, anyio.create_task_group() as tg:
        tg.start_soon(agent.serve_socket, theirs)
        async with (
            open_tunnel(ours, keys.credentials(USER)) as tunnel,
            tcp_server("echo") as port,
        ):
            assert tunnel.where == "a connected socket"
            assert (await tunnel.run("echo hi")).stdout == b"hi\n"
            async with await tunnel.dial("127.0.0.1", port) as stream:
                payload = bytes(range(256)) * 1024
                await stream.send(payload)
                received = b""
                with anyio.fail_after(5):
                    while len(received) < len(payload):
                        received += await stream.receive()
                assert received == payload
