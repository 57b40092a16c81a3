"""The SOCKS5 codec on scripted bytes: no sockets, one comment per chunk."""

from __future__ import annotations

import pytest

from tpconf.proxy.socks import (
    AddressType,
    Command,
    Greeting,
    Reply,
    Request,
    SocksProtocolError,
    build_method_selection,
    build_reply,
    parse_greeting,
    parse_request,
)


def test_greeting_offering_no_auth() -> None:
    data = (
        b"\x05"  # version 5
        b"\x01"  # one method
        b"\x00"  # no authentication
    )
    assert parse_greeting(data) == (Greeting(frozenset({0})), 3)


def test_greeting_is_incomplete_until_all_methods_arrived() -> None:
    assert parse_greeting(b"\x05") is None  # version only
    assert parse_greeting(b"\x05\x02\x00") is None  # two methods announced, one sent


def test_greeting_keeps_what_follows_it() -> None:
    data = (
        b"\x05\x02\x00\x02"  # version 5, two methods: none, username/password
        b"\x05\x01\x00"  # the request, already pipelined by the client
    )
    assert parse_greeting(data) == (Greeting(frozenset({0, 2})), 4)


def test_greeting_of_another_protocol_is_refused() -> None:
    with pytest.raises(SocksProtocolError):
        parse_greeting(b"GET / HTTP/1.1\r\n")  # HTTP sent to the SOCKS port


def test_method_selection() -> None:
    assert build_method_selection(0) == b"\x05\x00"  # version 5, no authentication
    assert build_method_selection(0xFF) == b"\x05\xff"  # version 5, nothing acceptable


def test_connect_by_domain_name() -> None:
    data = (
        b"\x05\x01\x00"  # version 5, CONNECT, reserved
        b"\x03\x05hello"  # ATYP domain, 5 bytes of name
        b"\x00\x50"  # port 80
    )
    assert parse_request(data) == (Request(Command.CONNECT, AddressType.DOMAIN, "hello", 80), 12)


def test_connect_by_ipv4_address() -> None:
    data = (
        b"\x05\x01\x00"  # version 5, CONNECT, reserved
        b"\x01\x0a\x60\x01\x01"  # ATYP IPv4, 10.96.1.1
        b"\x1f\x90"  # port 8080
    )
    assert parse_request(data) == (
        Request(Command.CONNECT, AddressType.IPV4, "10.96.1.1", 8080),
        10,
    )


def test_connect_by_ipv6_address() -> None:
    data = (
        b"\x05\x01\x00"  # version 5, CONNECT, reserved
        b"\x04" + b"\xfd" + b"\x00" * 14 + b"\x01"  # ATYP IPv6, fd00::1
        b"\x01\xbb"  # port 443
    )
    assert parse_request(data) == (Request(Command.CONNECT, AddressType.IPV6, "fd00::1", 443), 22)


def test_tor_resolve_and_resolve_ptr() -> None:
    resolve = (
        b"\x05\xf0\x00"  # version 5, RESOLVE (Tor), reserved
        b"\x03\x05hello"  # ATYP domain, "hello"
        b"\x00\x00"  # port 0: torsocks sends none
    )
    assert parse_request(resolve) == (Request(0xF0, AddressType.DOMAIN, "hello", 0), 12)
    resolve_ptr = (
        b"\x05\xf1\x00"  # version 5, RESOLVE_PTR (Tor), reserved
        b"\x01\x7f\x00\x00\x01"  # ATYP IPv4, 127.0.0.1
        b"\x00\x00"  # port 0
    )
    assert parse_request(resolve_ptr) == (Request(0xF1, AddressType.IPV4, "127.0.0.1", 0), 10)


def test_request_is_incomplete_until_the_port_arrived() -> None:
    assert parse_request(b"\x05\x01\x00\x03") is None  # header without the name length
    assert parse_request(b"\x05\x01\x00\x03\x05hel") is None  # half the name
    assert parse_request(b"\x05\x01\x00\x03\x05hello\x00") is None  # half the port


def test_unknown_commands_are_parsed_so_they_can_be_refused() -> None:
    data = (
        b"\x05\x02\x00"  # version 5, BIND, reserved
        b"\x01\x00\x00\x00\x00\x00\x00"  # 0.0.0.0:0
    )
    parsed = parse_request(data)
    assert parsed is not None
    assert parsed[0].command == Command.BIND


def test_unknown_address_type_carries_its_reply_code() -> None:
    with pytest.raises(SocksProtocolError) as caught:
        parse_request(b"\x05\x01\x00\x07\x00\x00")  # ATYP 7 does not exist
    assert caught.value.reply == Reply.ADDRESS_TYPE_NOT_SUPPORTED


def test_replies() -> None:
    assert build_reply(Reply.SUCCEEDED, "10.96.1.1") == (
        b"\x05\x00\x00"  # version 5, succeeded, reserved
        b"\x01\x0a\x60\x01\x01"  # ATYP IPv4, 10.96.1.1
        b"\x00\x00"  # port 0
    )
    assert build_reply(Reply.SUCCEEDED, "fd00::1")[3:4] == b"\x04"  # ATYP IPv6
    assert build_reply(Reply.SUCCEEDED, "localhost") == (
        b"\x05\x00\x00"  # version 5, succeeded, reserved
        b"\x03\x09localhost"  # ATYP domain: the RESOLVE_PTR answer
        b"\x00\x00"  # port 0
    )
    assert build_reply(Reply.HOST_UNREACHABLE) == (
        b"\x05\x04\x00"  # version 5, host unreachable, reserved
        b"\x01\x00\x00\x00\x00\x00\x00"  # 0.0.0.0:0
    )
