"""One pinned SSH connection against a real in-process asyncssh server on 127.0.0.1:0."""

from __future__ import annotations

import hashlib
import os
import socket
import struct

import anyio
import pytest
from anyio.abc import ByteStream

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
from tpconf.errors import ForwardFailed, HostKeyMismatch, Transient, TunnelDown, TunnelError
from tpconf.net import Dialer
from tpconf.tunnel import Credentials, ProxyKeys, TunnelSettings, open_tunnel
from tpconf.tunnel.stream import ChannelStream

from .peers import agent_server, freezable_proxy, tcp_server

pytestmark = pytest.mark.anyio

USER = "agent"


async def test_connects_with_the_pinned_host_key_and_runs_a_command(keys: ProxyKeys) -> None:
    async with (
        agent_server(keys) as agent,
        open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER)) as tunnel,
    ):
        result = await tunnel.run("echo out; echo err >&2; exit 3")
        assert result == (3, b"out\n", b"err\n")
        assert not tunnel.closed


async def test_keepalives_notice_a_peer_that_went_silent(keys: ProxyKeys) -> None:
    settings = TunnelSettings(keepalive_interval=0.1, keepalive_count_max=2)
    async with (
        agent_server(keys) as agent,
        freezable_proxy(agent.port) as (proxy, port),
        open_tunnel(("127.0.0.1", port), keys.credentials(USER), settings=settings) as tunnel,
    ):
        dialer: Dialer = tunnel  # the seam the proxy and DNS layers use
        assert dialer is tunnel
        proxy.freeze()  # no RST, no FIN: only keepalives can tell
        with anyio.fail_after(5):
            reason = await tunnel.wait_closed()
        assert "keepalive" in reason


async def test_an_already_connected_socket_works_as_endpoint(keys: ProxyKeys) -> None:
    async with agent_server(keys) as agent:
        sock = socket.create_connection(("127.0.0.1", agent.port))
        async with open_tunnel(sock, keys.credentials(USER)) as tunnel:
            assert (await tunnel.run("true")).exit_status == 0


async def test_another_host_key_is_refused_with_host_key_mismatch(
    keys: ProxyKeys, other_keys: ProxyKeys
) -> None:
    async with agent_server(keys, host_private_key=other_keys.host_private_key) as agent:
        with pytest.raises(HostKeyMismatch, match="host key other than the one tpconf generated"):
            async with open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER)):
                pytest.fail("connected despite a wrong host key")


async def test_another_client_key_is_refused_and_not_retried(
    keys: ProxyKeys, other_keys: ProxyKeys
) -> None:
    wrong = Credentials(
        username=USER, client_key=other_keys.client_private_key, host_key=keys.host_public_key
    )
    async with agent_server(keys) as agent:
        with pytest.raises(TunnelError, match="refused tpconf's client key") as caught:
            async with open_tunnel(("127.0.0.1", agent.port), wrong):
                pytest.fail("connected with a wrong client key")
    assert not isinstance(caught.value, (Transient, HostKeyMismatch))


async def test_nothing_listening_is_a_transient_tunnel_down() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    keys = ProxyKeys.generate()
    with pytest.raises(TunnelDown, match=f"127.0.0.1:{port}"):
        async with open_tunnel(("127.0.0.1", port), keys.credentials(USER)):
            pass


async def test_dial_keeps_half_close_a_client_that_sent_eof_still_gets_the_reply(
    keys: ProxyKeys,
) -> None:
    async with (
        agent_server(keys) as agent,
        open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER)) as tunnel,
        tcp_server("reply-after-eof") as port,
    ):
        stream = await tunnel.dial("127.0.0.1", port)
        async with stream:
            await stream.send(b"hello")
            await stream.send_eof()
            with anyio.fail_after(5):
                reply = b"".join([chunk async for chunk in stream])
        assert reply == b"got HELLO"


async def _transfer(stream: ByteStream, size: int) -> bytes:
    """Send ``size`` random bytes while reading the echo; return the echo's sha256."""
    payload = os.urandom(size)
    digest = hashlib.sha256()
    received = 0

    async def send() -> None:
        view = memoryview(payload)
        for start in range(0, size, 256 * 1024):
            await stream.send(bytes(view[start : start + 256 * 1024]))
        await stream.send_eof()

    async with anyio.create_task_group() as tg:
        tg.start_soon(send)
        async for chunk in stream:
            assert len(chunk) <= 65536
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert digest.digest() == hashlib.sha256(payload).digest()
    return digest.digest()


async def test_dial_moves_10_mb_both_ways_intact(keys: ProxyKeys) -> None:
    async with (
        agent_server(keys) as agent,
        open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER)) as tunnel,
        tcp_server("echo") as port,
        await tunnel.dial("127.0.0.1", port) as stream,
    ):
        with anyio.fail_after(20):
            await _transfer(stream, 10 * 1024 * 1024)


async def test_a_slow_reader_slows_the_sender_instead_of_buffering_everything(
    keys: ProxyKeys,
) -> None:
    settings = TunnelSettings(read_limit=64 * 1024, channel_window=256 * 1024)
    async with (
        agent_server(keys) as agent,
        open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER), settings=settings) as tunnel,
        tcp_server("echo") as port,
        await tunnel.dial("127.0.0.1", port) as stream,
    ):
        sent = 0
        with anyio.move_on_after(0.5):
            while True:  # nobody reads the echo: sending must stall
                await stream.send(b"x" * 65536)
                sent += 65536
        assert sent < 16 * 1024 * 1024
        assert isinstance(stream, ChannelStream)
        assert stream.buffered <= 64 * 1024 + 32 * 1024


async def test_an_exposed_port_is_slowed_down_by_a_local_server_that_does_not_read(
    keys: ProxyKeys,
) -> None:
    """The pod side of `expose` (the agent, here in-process too) writes into a stalled server."""
    async with (
        agent_server(keys) as agent,
        open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER)) as tunnel,
        stalled_server() as local_port,
    ):
        forward = await tunnel.forward_remote(0, local_port, bind_host="127.0.0.1")
        with writer_socket() as sock:
            await connect(sock, forward.port)
            with watch_memory() as memory:
                sent = await push(sock, seconds=2, limit=PUSH)
        await forward.aclose()
    # The SSH window (2 MiB) and the agent's and tpconf's socket buffers, nothing more.
    assert sent < MAX_IN_FLIGHT, f"{sent / MiB:.0f} MiB went into a stalled local server"
    assert memory.peak < MAX_GROWTH, f"{memory.peak / MiB:.1f} MiB allocated"


async def test_dial_to_a_closed_port_raises_connection_refused(keys: ProxyKeys) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with (
        agent_server(keys) as agent,
        open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER)) as tunnel,
    ):
        with pytest.raises(ConnectionRefusedError):
            await tunnel.dial("127.0.0.1", port)


async def test_dial_after_the_server_died_raises_tunnel_down(keys: ProxyKeys) -> None:
    async with (
        agent_server(keys) as agent,
        open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER)) as tunnel,
    ):
        await agent.kill()
        with anyio.fail_after(5):
            reason = await tunnel.wait_closed()
        assert "lost" in reason or "closed" in reason
        with pytest.raises(TunnelDown):
            await tunnel.dial("127.0.0.1", 9)


async def test_remote_forward_delivers_connections_to_the_local_server(keys: ProxyKeys) -> None:
    async with (
        agent_server(keys) as agent,
        open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER)) as tunnel,
        tcp_server("reply-after-eof") as local_port,
    ):
        forward = await tunnel.forward_remote(0, local_port, bind_host="127.0.0.1")
        assert forward.port > 0
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", forward.port) as client:
                await client.send(b"from the pod")
                await client.send_eof()
                assert b"".join([c async for c in client]) == b"got FROM THE POD"
        await forward.aclose()
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", forward.port)


async def test_remote_forward_to_a_port_in_use_fails_naming_the_port(keys: ProxyKeys) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        async with (
            agent_server(keys) as agent,
            open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER)) as tunnel,
        ):
            with pytest.raises(ForwardFailed, match=f"port {port}") as caught:
                await tunnel.forward_remote(port, 1, bind_host="127.0.0.1")
    assert caught.value.hint is not None and "already listens" in caught.value.hint


def _sftp_init() -> bytes:
    body = bytes([1]) + struct.pack(">I", 3)  # SSH_FXP_INIT, version 3
    return struct.pack(">I", len(body)) + body


async def test_the_sftp_stream_speaks_sftp(keys: ProxyKeys) -> None:
    async with (
        agent_server(keys) as agent,
        open_tunnel(("127.0.0.1", agent.port), keys.credentials(USER)) as tunnel,
        await tunnel.open_sftp_stream() as stream,
    ):
        await stream.send(_sftp_init())
        with anyio.fail_after(5):
            reply = await stream.receive()
        assert reply[4] == 2  # SSH_FXP_VERSION
