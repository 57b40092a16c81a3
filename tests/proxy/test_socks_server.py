"""SocksServer on real loopback sockets: SOCKS5 clients written byte by byte, a fake cluster."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.proxy.fakes import HELLO_IP, FakeNameserver, MapDialer
from tpconf.proxy.resolver import ClusterResolver
from tpconf.proxy.socks import Reply, SocksServer

pytestmark = pytest.mark.anyio


async def echo_then_report(stream: SocketStream) -> None:
    """Echo everything; after the client's EOF, say how much came and close."""
    total = 0
    async with stream:
        try:
            while True:
                data = await stream.receive()
                total += len(data)
                await stream.send(data)
        except anyio.EndOfStream:
            await stream.send(b"[got %d bytes]" % total)


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, echo_then_report)
        yield listener.extra(SocketAttribute.local_port)
        tg.cancel_scope.cancel()


@pytest.fixture
async def socks(
    resolver: ClusterResolver, dialer: MapDialer, echo_port: int
) -> AsyncIterator[SocksServer]:
    dialer.routes[(HELLO_IP, 80)] = ("127.0.0.1", echo_port)
    dialer.routes[("fd00::1", 80)] = ("127.0.0.1", echo_port)
    server = SocksServer(resolver, dialer, handshake_timeout=1.0, connect_timeout=1.0)
    async with anyio.create_task_group() as tg:
        server.port = await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


def request(command: int, host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        address = b"\x03" + bytes((len(host),)) + host.encode()
    else:
        address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    return bytes((5, command, 0)) + address + port.to_bytes(2, "big")


async def read_reply(reader: BufferedByteReceiveStream) -> tuple[int, str, int]:
    """REP, BND.ADDR as text, BND.PORT."""
    version, rep, _, atyp = await reader.receive_exactly(4)
    assert version == 5
    if atyp == 1:
        host = str(ipaddress.IPv4Address(await reader.receive_exactly(4)))
    elif atyp == 4:
        host = str(ipaddress.IPv6Address(await reader.receive_exactly(16)))
    else:
        host = (await reader.receive_exactly((await reader.receive_exactly(1))[0])).decode()
    port = int.from_bytes(await reader.receive_exactly(2), "big")
    return rep, host, port


async def ask(
    server: SocksServer, command: int, host: str, port: int = 0
) -> tuple[ByteStream, BufferedByteReceiveStream, tuple[int, str, int]]:
    stream = await anyio.connect_tcp("127.0.0.1", server.port)
    reader = BufferedByteReceiveStream(stream)
    await stream.send(b"\x05\x01\x00")
    assert await reader.receive_exactly(2) == b"\x05\x00"
    await stream.send(request(command, host, port))
    return stream, reader, await read_reply(reader)


async def read_all(reader: BufferedByteReceiveStream) -> bytes:
    data = b""
    while True:
        try:
            data += await reader.receive()
        except anyio.EndOfStream:
            return data


@pytest.mark.parametrize("host", ["hello", "hello.default.svc.cluster.local", HELLO_IP, "fd00::1"])
async def test_connect_reaches_the_cluster_through_the_dialer(
    socks: SocksServer, dialer: MapDialer, host: str
) -> None:
    with anyio.fail_after(5):
        stream, reader, (rep, _, _) = await ask(socks, 0x01, host, 80)
        async with stream:
            assert rep == Reply.SUCCEEDED
            await stream.send(b"ping")
            assert await reader.receive_exactly(4) == b"ping"
    assert dialer.calls[-1] == ("fd00::1" if ":" in host else HELLO_IP, 80)


async def test_half_close_is_passed_on_and_the_reply_still_arrives(socks: SocksServer) -> None:
    with anyio.fail_after(5):
        stream, reader, (rep, _, _) = await ask(socks, 0x01, "hello", 80)
        async with stream:
            assert rep == Reply.SUCCEEDED
            payload = b"x" * 300_000  # larger than one relay chunk
            await stream.send(payload)
            await stream.send_eof()  # our side is done; the answer must still come back
            assert await read_all(reader) == payload + b"[got 300000 bytes]"


async def test_the_server_closing_first_leaves_the_client_side_open(
    resolver: ClusterResolver, dialer: MapDialer
) -> None:
    received: list[bytes] = []

    async def speaks_first(stream: SocketStream) -> None:
        async with stream:
            await stream.send(b"banner")
            await stream.send_eof()
            received.append(await read_all(BufferedByteReceiveStream(stream)))

    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, speaks_first)
        dialer.routes[(HELLO_IP, 25)] = ("127.0.0.1", listener.extra(SocketAttribute.local_port))
        server = SocksServer(resolver, dialer)
        server.port = await tg.start(server.serve)
        with anyio.fail_after(5):
            stream, reader, (rep, _, _) = await ask(server, 0x01, HELLO_IP, 25)
            async with stream:
                assert rep == Reply.SUCCEEDED
                assert await read_all(reader) == b"banner"
                await stream.send(b"still talking")
                await stream.send_eof()
                while not received:  # noqa: ASYNC110  (the peer's handler, no event)
                    await anyio.sleep(0.01)
        assert received == [b"still talking"]
        tg.cancel_scope.cancel()


async def test_loopback_destinations_are_connected_locally(
    socks: SocksServer, dialer: MapDialer, echo_port: int
) -> None:
    calls = len(dialer.calls)
    for host in ("127.0.0.1", "localhost"):
        with anyio.fail_after(5):
            stream, reader, (rep, _, _) = await ask(socks, 0x01, host, echo_port)
            async with stream:
                assert rep == Reply.SUCCEEDED
                await stream.send(b"local")
                assert await reader.receive_exactly(5) == b"local"
    assert len(dialer.calls) == calls  # never the cluster


@pytest.mark.parametrize(
    ("command", "host", "port", "code"),
    [
        (0x01, "nosuch", 80, Reply.HOST_UNREACHABLE),  # NXDOMAIN in the cluster
        (0x01, HELLO_IP, 81, Reply.CONNECTION_REFUSED),  # the pod cannot connect there
        (0x02, "0.0.0.0", 0, Reply.COMMAND_NOT_SUPPORTED),  # BIND
        (0x03, "0.0.0.0", 0, Reply.COMMAND_NOT_SUPPORTED),  # UDP ASSOCIATE
        (0xF0, "nosuch", 0, Reply.HOST_UNREACHABLE),  # Tor RESOLVE of an unknown name
    ],
)
async def test_failures_are_answered_at_once_with_a_code(
    socks: SocksServer, command: int, host: str, port: int, code: Reply
) -> None:
    with anyio.fail_after(2):
        stream, _, (rep, _, _) = await ask(socks, command, host, port)
        await stream.aclose()
    assert rep == code


async def test_resolve_applies_the_search_list_and_answers_ipv4(socks: SocksServer) -> None:
    with anyio.fail_after(2):
        stream, _, reply = await ask(socks, 0xF0, "hello")
        await stream.aclose()
    assert reply == (Reply.SUCCEEDED, HELLO_IP, 0)


async def test_resolve_of_an_ipv6_only_name_answers_ipv6(socks: SocksServer) -> None:
    with anyio.fail_after(2):
        stream, _, reply = await ask(socks, 0xF0, "hello6.default")
        await stream.aclose()
    assert reply == (Reply.SUCCEEDED, "fd00::1", 0)


async def test_resolve_ptr_of_loopback_is_answered_locally(
    socks: SocksServer, nameserver: FakeNameserver
) -> None:
    for address in ("127.0.0.1", "::1"):
        with anyio.fail_after(2):
            stream, _, reply = await ask(socks, 0xF1, address)
            await stream.aclose()
        assert reply == (Reply.SUCCEEDED, "localhost", 0)
    assert nameserver.questions == []


async def test_resolve_ptr_of_a_cluster_address_asks_the_cluster(socks: SocksServer) -> None:
    with anyio.fail_after(2):
        stream, _, reply = await ask(socks, 0xF1, HELLO_IP)
        await stream.aclose()
    assert reply == (Reply.SUCCEEDED, "hello.default.svc.cluster.local", 0)


async def test_resolve_ptr_of_an_address_without_a_name_answers_the_address_as_a_name(
    socks: SocksServer,
) -> None:
    """An error here makes torsocks hand the program the previous lookup's name."""
    with anyio.fail_after(2):
        async with await anyio.connect_tcp("127.0.0.1", socks.port) as stream:
            await stream.send(b"\x05\x01\x00" + request(0xF1, "10.96.9.9", 0))
            raw = await read_all(BufferedByteReceiveStream(stream))
    # ATYP domain (3), even for an address: torsocks refuses an address in a RESOLVE_PTR reply
    assert raw == b"\x05\x00" + b"\x05\x00\x00\x03\x09" + b"10.96.9.9" + b"\x00\x00"


async def test_unknown_address_type_and_auth_methods_are_refused(socks: SocksServer) -> None:
    with anyio.fail_after(2):
        async with await anyio.connect_tcp("127.0.0.1", socks.port) as stream:
            reader = BufferedByteReceiveStream(stream)
            await stream.send(b"\x05\x01\x00" + b"\x05\x01\x00\x07\x00\x00")
            assert await reader.receive_exactly(2) == b"\x05\x00"
            assert (await reader.receive_exactly(3))[1] == Reply.ADDRESS_TYPE_NOT_SUPPORTED
        async with await anyio.connect_tcp("127.0.0.1", socks.port) as stream:
            await stream.send(b"\x05\x01\x02")  # username/password only
            assert await stream.receive() == b"\x05\xff"


async def test_bad_clients_do_not_affect_the_server_or_leak_tasks(socks: SocksServer) -> None:
    with anyio.fail_after(5):
        async with await anyio.connect_tcp("127.0.0.1", socks.port) as bad:
            await bad.send(b"GET / HTTP/1.1\r\n\r\n")
            await read_all(BufferedByteReceiveStream(bad))
        async with await anyio.connect_tcp("127.0.0.1", socks.port) as bad:
            await bad.send(b"\x05\x01")  # gives up in the middle of the greeting
        for _ in range(20):
            stream, reader, (rep, _, _) = await ask(socks, 0x01, "hello", 80)
            async with stream:
                assert rep == Reply.SUCCEEDED
                await stream.send(b"x")
                await stream.send_eof()
                assert await read_all(reader) == b"x[got 1 bytes]"
        while socks.active:  # noqa: ASYNC110  (a counter, no event)
            await anyio.sleep(0.01)


async def test_a_taken_port_is_a_proxy_error(resolver: ClusterResolver, socks: SocksServer) -> None:
    from tpconf.errors import ProxyError

    with pytest.raises(ProxyError, match="cannot listen"):
        await SocksServer(resolver, MapDialer(), port=socks.port).serve()
