"""The relay data path: tpconf.tunnel.mux against the agent's relay (tpconf/agent/relay.py) on
loopback, then the whole tunnel over the in-process port-forward (a local SPDY peer, an
in-process SSH agent running the relay)."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from tests.load.pressure import stalled_server
from tpconf.agent import relay
from tpconf.errors import TunnelDown
from tpconf.tunnel import ProxyKeys, TunnelSettings, open_tunnel
from tpconf.tunnel.mux import MuxChannel, MuxSession, _open_error, new_key

from .peers import agent_server, tcp_server
from .spdy_peer import spdy_peer
from .test_spdy import local_api

pytestmark = pytest.mark.anyio

WINDOW = 256 * 1024


class _Port(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.ready = asyncio.Event()

    def flush(self) -> None:
        self.ready.set()


@asynccontextmanager
async def relay_session(
    *, key: bytes | None = None, client_key: bytes | None = None, window: int = WINDOW
) -> AsyncIterator[tuple[MuxSession, asyncio.Task[int]]]:
    """The relay on 127.0.0.1 and a handshaken client session to it."""
    key = key or new_key()
    out = _Port()
    served = asyncio.ensure_future(relay.serve(key, port_out=out))
    try:
        with anyio.fail_after(5):
            await out.ready.wait()
        loop = asyncio.get_running_loop()
        _, session = await loop.create_connection(
            lambda: MuxSession(client_key or key, window=window, where="test"),
            "127.0.0.1",
            int(out.getvalue()),
        )
        try:
            yield session, served
        finally:
            session.close()
    finally:
        with anyio.fail_after(5):
            await served


async def test_a_dial_carries_bytes_and_half_close() -> None:
    async with relay_session() as (session, _), tcp_server("reply-after-eof") as port:
        await session.handshake(5)
        with anyio.fail_after(5):
            channel = await session.dial("127.0.0.1", port)
            async with channel:
                await channel.send(b"ping")
                await channel.send_eof()  # the server answers only after our EOF
                assert await channel.receive() == b"got PING"
                with pytest.raises(anyio.EndOfStream):
                    await channel.receive()
        assert session.channel_count == 0


async def test_a_refused_connect_is_the_pods_oserror() -> None:
    async with relay_session() as (session, _):
        await session.handshake(5)
        with anyio.fail_after(10), pytest.raises(OSError) as caught:
            await session.dial("127.0.0.1", 1)
        assert caught.value.errno == errno.ECONNREFUSED
        assert session.channel_count == 0


def test_a_name_the_pod_cannot_resolve_is_a_gaierror() -> None:
    # The relay's OPEN_FAIL for a socket.gaierror (no real lookup here: it would leave the box).
    payload = (
        struct.pack(">Bh", relay.FAIL_GAIERROR, socket.EAI_NONAME) + b"Name or service not known"
    )
    error = _open_error(payload)
    assert isinstance(error, socket.gaierror)
    assert error.errno == socket.EAI_NONAME
    assert "resolved in the pod" in str(error)


async def test_a_client_without_the_key_is_cut_off_and_the_listener_is_gone() -> None:
    async with relay_session(client_key=os.urandom(32)) as (session, served):
        with pytest.raises(TunnelDown):
            await session.handshake(5)
        with anyio.fail_after(5):
            assert await served == 0  # the one connection was the wrong one: the relay ends


async def test_the_relay_serves_one_connection_only() -> None:
    async with relay_session() as (session, _):
        await session.handshake(5)
        port = session._transport.get_extra_info("peername")[1]  # type: ignore[union-attr]
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)


async def test_many_channels_at_once_each_get_their_own_bytes() -> None:
    async with relay_session() as (session, _), tcp_server("echo") as port:
        await session.handshake(5)

        async def one(i: int) -> None:
            async with await session.dial("127.0.0.1", port) as channel:
                message = f"channel {i} ".encode() * 100
                await channel.send(message)
                got = b""
                while len(got) < len(message):
                    got += await channel.receive()
                assert got == message

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(one, i)
        assert session.channel_count == 0


async def test_a_download_nobody_reads_holds_at_most_a_window() -> None:
    async with relay_session() as (session, _), tcp_server("source") as port:
        await session.handshake(5)
        channel = await session.dial("127.0.0.1", port)
        async with channel:
            await channel.send((64 * 1024 * 1024).to_bytes(8, "big"))
            await anyio.sleep(1.0)  # the source writes as fast as it can; nobody reads
            assert isinstance(channel, MuxChannel)
            assert WINDOW // 2 <= channel.buffered <= WINDOW
            received = 0
            with anyio.fail_after(30):
                async for chunk in channel:
                    received += len(chunk)
            assert received == 64 * 1024 * 1024  # and all of it arrives once read


async def test_an_upload_to_a_stalled_server_waits_after_a_window() -> None:
    async with relay_session() as (session, _), stalled_server() as port:
        await session.handshake(5)
        channel = await session.dial("127.0.0.1", port)
        sent = 0
        block = bytes(64 * 1024)
        async with channel:
            with anyio.move_on_after(1.5):
                while True:
                    await channel.send(block)
                    sent += len(block)
        # the window, plus what the kernel buffers on the way to the stalled server
        assert WINDOW <= sent < WINDOW + 32 * 1024 * 1024


async def test_a_cancelled_dial_leaves_nothing_open_on_either_side() -> None:
    accepted: list[socket.socket] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    async def accept() -> None:
        while True:
            await anyio.wait_readable(listener)
            accepted.append(listener.accept()[0])

    async with relay_session() as (session, _), anyio.create_task_group() as tg:
        tg.start_soon(accept)
        await session.handshake(5)
        with anyio.CancelScope() as scope:
            scope.cancel()  # OPEN leaves at once, then the wait for its answer is cancelled
            await session.dial("127.0.0.1", listener.getsockname()[1])
        assert session.channel_count == 0
        with anyio.fail_after(5):
            while not accepted:  # noqa: ASYNC110 (the relay did connect...)
                await anyio.sleep(0.01)
            accepted[0].setblocking(True)
            accepted[0].settimeout(5)
            assert accepted[0].recv(1) == b""  # ...and closed it, since we gave up on it
        tg.cancel_scope.cancel()
    for conn in [*accepted, listener]:
        conn.close()


async def test_the_tunnel_dials_through_the_relay_over_the_in_process_port_forward(
    keys: ProxyKeys,
) -> None:
    async with (
        agent_server(keys) as agent,
        spdy_peer() as peer,
        tcp_server("echo") as echo,
        local_api(peer).port_forward("ns", "agent", timeout=5) as link,
    ):
        peer.ports[8022] = agent.port
        async with open_tunnel(link, keys.credentials("agent")) as tunnel:
            assert await tunnel.relay_ready() is not None
            with anyio.fail_after(10):
                stream = await tunnel.dial("127.0.0.1", echo)
                async with stream:
                    await stream.send(b"through the relay")
                    assert await stream.receive() == b"through the relay"
                result = await tunnel.run("echo ssh still works")
            assert result.stdout == b"ssh still works\n"
            relay_streams = [sid for sid in peer.frames if sid != 3]
            assert relay_streams  # the bytes went on a stream of their own, not SSH's


async def test_dial_goes_over_ssh_until_the_relay_is_up(keys: ProxyKeys) -> None:
    async with (
        agent_server(keys) as agent,
        spdy_peer() as peer,
        tcp_server("echo") as echo,
        local_api(peer).port_forward("ns", "agent", timeout=5) as link,
    ):
        peer.ports[8022] = agent.port
        async with open_tunnel(link, keys.credentials("agent")) as tunnel:
            assert tunnel.relay is None  # starting beside the connection, not before it
            with anyio.fail_after(10):
                async with await tunnel.dial("127.0.0.1", echo) as early:
                    assert await tunnel.relay_ready() is not None
                    await early.send(b"over ssh, still")  # the early one stays where it began
                    assert await early.receive() == b"over ssh, still"
                    assert not isinstance(early, MuxChannel)


async def test_with_the_relay_off_dial_uses_ssh_channels(keys: ProxyKeys) -> None:
    async with (
        agent_server(keys) as agent,
        spdy_peer() as peer,
        tcp_server("echo") as echo,
        local_api(peer).port_forward("ns", "agent", timeout=5) as link,
    ):
        peer.ports[8022] = agent.port
        settings = TunnelSettings(relay=False)
        async with open_tunnel(link, keys.credentials("agent"), settings=settings) as tunnel:
            assert await tunnel.relay_ready() is None
            with anyio.fail_after(10):
                async with await tunnel.dial("127.0.0.1", echo) as stream:
                    await stream.send(b"over ssh")
                    assert await stream.receive() == b"over ssh"


async def test_when_the_relay_ends_the_tunnel_closes_for_a_reconnect(keys: ProxyKeys) -> None:
    async with (
        agent_server(keys) as agent,
        spdy_peer() as peer,
        local_api(peer).port_forward("ns", "agent", timeout=5) as link,
    ):
        peer.ports[8022] = agent.port
        async with open_tunnel(link, keys.credentials("agent")) as tunnel:
            relay = await tunnel.relay_ready()
            assert relay is not None
            relay.close()
            with anyio.fail_after(5):
                reason = await tunnel.wait_closed()
            assert reason


async def test_sftp_runs_as_a_subsystem_channel_and_ends_with_our_eof() -> None:
    async with relay_session() as (session, _):
        await session.handshake(5)
        with anyio.fail_after(10):
            channel = await session.open_subsystem("sftp")
            async with channel:
                await channel.send(struct.pack(">IBI", 5, 1, 3))  # SSH_FXP_INIT, version 3
                reply = b""
                while len(reply) < 9:
                    reply += await channel.receive()
                length, kind, version = struct.unpack(">IBI", reply[:9])
                assert (kind, version) == (2, 3)  # SSH_FXP_VERSION 3: sftp-server answers
                await channel.send_eof()  # sftp-server exits at EOF, and the channel ends
                rest = b"".join([chunk async for chunk in channel])
                assert len(reply) + len(rest) == 4 + length
        assert session.channel_count == 0


@pytest.mark.parametrize("closed_first", [True, False], ids=["channel-closed", "channel-open"])
async def test_the_relay_returns_only_once_its_subsystem_programs_are_waited_for(
    monkeypatch: pytest.MonkeyPatch, closed_first: bool
) -> None:
    """The session ends right after sftp's channel was closed (sftp-server still exiting), or
    while it is open: when serve() returns, the program has exited and been waited for. (The
    relay used to return first; the garbage collector later found the program's transport open,
    a ResourceWarning that failed an unrelated test.)"""
    started: list[relay.Subsystem] = []
    made = relay.Subsystem.connection_made

    def record(self: relay.Subsystem, transport: asyncio.BaseTransport) -> None:
        started.append(self)
        made(self, transport)

    monkeypatch.setattr(relay.Subsystem, "connection_made", record)
    at_return: list[tuple[int | None, bool]] = []
    async with relay_session() as (session, served):
        # What is true the moment serve() returns, before anything else runs.
        served.add_done_callback(
            lambda _: at_return.extend(
                (s.process.get_returncode(), s.process.is_closing()) for s in started
            )
        )
        await session.handshake(5)
        with anyio.fail_after(10):
            channel = await session.open_subsystem("sftp")
            await channel.send(struct.pack(">IBI", 5, 1, 3))  # SSH_FXP_INIT, version 3
            assert len(await channel.receive()) >= 9  # SSH_FXP_VERSION: it runs
            if closed_first:
                await channel.aclose()  # sftp-server reads EOF and exits by itself
    assert len(at_return) == 1
    code, transport_closed = at_return[0]
    assert code is not None and transport_closed, "waited for before serve() returned"


async def test_an_unknown_subsystem_is_refused() -> None:
    async with relay_session() as (session, _):
        await session.handshake(5)
        with anyio.fail_after(5), pytest.raises(OSError) as caught:
            await session.open_subsystem("shell")
        assert caught.value.errno == errno.ENOENT


async def test_an_early_dial_sends_before_the_pod_has_connected() -> None:
    async with relay_session() as (session, _), tcp_server("reply-after-eof") as port:
        await session.handshake(5)
        with anyio.fail_after(10):
            channel = await session.dial("127.0.0.1", port, early=True)
            assert not channel._opened.done()  # nothing heard from the relay yet
            async with channel:
                await channel.send(b"early")  # kept by the relay until it has connected
                await channel.send_eof()
                assert await channel.receive() == b"got EARLY"
            assert channel.open_error is None


async def test_an_early_dial_that_fails_breaks_with_the_reason() -> None:
    async with relay_session() as (session, _):
        await session.handshake(5)
        with anyio.fail_after(10):
            channel = await session.dial("127.0.0.1", 1, early=True)
            async with channel:
                with pytest.raises(anyio.BrokenResourceError):
                    await channel.receive()
            assert isinstance(channel.open_error, OSError)
            assert channel.open_error.errno == errno.ECONNREFUSED
        assert session.channel_count == 0
