"""Fuzzing the SOCKS codec and the SOCKS server.

The codec parses or refuses any bytes (only ``SocksProtocolError``, never a crash or a length
past the input) and reads back every request it could be sent. The server, fed any bytes by a
client that then shuts its side, answers or closes within its handshake timeout, and keeps
serving: a well-formed RESOLVE after each hostile client is answered.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.from_thread import BlockingPortal
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ
from tests.proxy.fakes import HELLO_IP, POD_NAMESERVER, POD_SEARCH, FakeNameserver, MapDialer
from tpconf.proxy.resolver import ClusterResolver
from tpconf.proxy.socks import (
    AddressType,
    Reply,
    SocksProtocolError,
    SocksServer,
    parse_greeting,
    parse_request,
)

pytestmark = pytest.mark.timeout(180)

HANDSHAKE_TIMEOUT = 0.5


@FUZZ
@given(st.binary(max_size=600))
def test_the_codec_parses_or_refuses_any_bytes(data: bytes) -> None:
    for parse in (parse_greeting, parse_request):
        try:
            parsed = parse(data)
        except SocksProtocolError as exc:
            assert isinstance(exc.reply, Reply)
        else:
            assert parsed is None or 0 < parsed[1] <= len(data)


hosts = st.one_of(
    st.ip_addresses(v=4).map(lambda a: (AddressType.IPV4, str(a))),
    st.ip_addresses(v=6).map(lambda a: (AddressType.IPV6, str(a))),
    st.text(st.characters(codec="ascii", exclude_characters="\0"), min_size=1, max_size=255)
    .filter(lambda t: not _is_address(t))
    .map(lambda t: (AddressType.DOMAIN, t)),
)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _request(command: int, atyp: AddressType, host: str, port: int) -> bytes:
    if atyp == AddressType.DOMAIN:
        address = bytes((len(host),)) + host.encode()
    else:
        address = ipaddress.ip_address(host).packed
    return bytes((5, command, 0, atyp)) + address + port.to_bytes(2, "big")


@FUZZ
@given(st.integers(0, 255), hosts, st.integers(0, 65535), st.binary(max_size=20))
def test_every_request_reads_back_and_a_cut_one_waits_for_more(
    command: int, host: tuple[AddressType, str], port: int, after: bytes
) -> None:
    atyp, text = host
    raw = _request(command, atyp, text, port)
    parsed = parse_request(raw + after)
    assert parsed is not None
    request, used = parsed
    assert used == len(raw)
    assert (request.command, request.address_type, request.port) == (command, atyp, port)
    assert request.host == text
    assert parse_request(raw[:-1]) is None


@asynccontextmanager
async def socks_server() -> AsyncIterator[int]:
    nameserver = FakeNameserver()
    async with anyio.create_task_group() as tg:
        await tg.start(nameserver.serve_tcp)
        dialer = MapDialer(routes={(POD_NAMESERVER, 53): ("127.0.0.1", nameserver.port)})
        async with ClusterResolver(dialer, [POD_NAMESERVER], POD_SEARCH, ndots=5) as resolver:
            server = SocksServer(
                resolver, dialer, handshake_timeout=HANDSHAKE_TIMEOUT, connect_timeout=1
            )
            yield await tg.start(server.serve)
            tg.cancel_scope.cancel()


@pytest.fixture(scope="module")
def socks_port(portal: BlockingPortal) -> Iterator[int]:
    with portal.wrap_async_context_manager(socks_server()) as port:
        yield port


def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, shut the write side, read until the server closes (or fail after 5 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:  # the server may have answered and closed already
            pass
        received = b""
        while True:
            try:
                chunk = conn.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received


greetings = st.sampled_from([b"", b"\x05\x01\x00", b"\x05\x02\x00\x02", b"\x04\x01"])


@FUZZ
@given(greetings, st.binary(max_size=400))
def test_any_client_gets_an_answer_or_a_close_and_the_server_keeps_serving(
    socks_port: int, greeting: bytes, data: bytes
) -> None:
    reply = _exchange(socks_port, greeting + data)  # never hangs: a socket timeout would raise
    if reply:
        assert reply[0] == 5
    resolved = _exchange(
        socks_port, b"\x05\x01\x00" + _request(0xF0, AddressType.DOMAIN, "hello", 0)
    )
    assert resolved == b"\x05\x00" + b"\x05\x00\x00\x01" + socket.inet_aton(HELLO_IP) + b"\0\0"
