"""The SOCKS5 server of inject-tcp: what torsocks talks to on behalf of the wrapped process.

Owns a sans-IO codec (``parse_*`` / ``build_*``: bytes in, values out, no sockets) and
:class:`SocksServer`, the anyio server around it. Supported: the no-authentication method;
CONNECT to a domain name, an IPv4 or an IPv6 address; Tor's RESOLVE (0xF0) and RESOLVE_PTR
(0xF1), which torsocks uses for every name lookup of the process.

* Names are resolved by the :class:`~tpconf.proxy.resolver.ClusterResolver` (the pod's search
  list applied: torsocks sends the name exactly as the program wrote it); connections leave
  through the :class:`~tpconf.net.Dialer`, that is from the proxy pod.
* Loopback stays local: ``localhost``, 127.0.0.0/8 and ::1 are connected from this machine, and a
  RESOLVE_PTR of a loopback address is answered ``localhost`` without asking the cluster
  (``python3 -m http.server`` asks for 127.0.0.1 at start-up and hangs forever without a reply).
* A RESOLVE_PTR the cluster has no name for is answered with the address itself (torsocks
  would otherwise hand the program a stale name, see :meth:`SocksServer._resolve_ptr`).
* Every request gets a reply at once, an error code at worst; a connection's failure is logged
  and never reaches the server.
* The relay propagates half-close: EOF from one side is passed on with ``send_eof`` and the other
  direction keeps flowing until it ends too.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from anyio.abc import ByteStream, TaskStatus

from tpconf import errors
from tpconf.net import MAX_CONNECTIONS, TCPListener, relay
from tpconf.proxy.resolver import ResolveError

if TYPE_CHECKING:
    from collections.abc import Callable

    from tpconf.net import Dialer
    from tpconf.proxy.resolver import ClusterResolver

log = logging.getLogger(__name__)

_T = TypeVar("_T")

VERSION = 5


class Method(IntEnum):
    """Authentication methods (RFC 1928 section 3)."""

    NO_AUTH = 0x00
    NO_ACCEPTABLE = 0xFF


class Command(IntEnum):
    """Request commands: RFC 1928 plus Tor's extensions (tor socks-extensions.txt)."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03
    RESOLVE = 0xF0
    RESOLVE_PTR = 0xF1


class AddressType(IntEnum):
    """ATYP values."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(IntEnum):
    """REP values of a reply."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class SocksProtocolError(Exception):
    """Raised by the codec on bytes that break the protocol; ``reply`` is the code to answer."""

    def __init__(self, message: str, reply: Reply = Reply.GENERAL_FAILURE) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Greeting:
    """The client's first message: the authentication methods it offers."""

    methods: frozenset[int]


@dataclass(frozen=True, slots=True)
class Request:
    """A request: ``command`` is kept as a number so unknown ones can be refused with code 7."""

    command: int
    address_type: AddressType
    host: str
    """A domain name as sent, or an address in its canonical text form."""
    port: int


# -- codec ------------------------------------------------------------------------------------


def parse_greeting(data: bytes) -> tuple[Greeting, int] | None:
    """The greeting at the start of ``data`` and its length; ``None`` until it is complete.

    ``VER NMETHODS METHODS...``
    """
    if len(data) < 2:
        return None
    if data[0] != VERSION:
        raise SocksProtocolError(f"not SOCKS5 (version byte {data[0]})")
    end = 2 + data[1]
    if len(data) < end:
        return None
    return Greeting(frozenset(data[2:end])), end


def parse_request(data: bytes) -> tuple[Request, int] | None:
    """The request at the start of ``data`` and its length; ``None`` until it is complete.

    ``VER CMD RSV ATYP DST.ADDR DST.PORT``; DST.ADDR is 4 bytes, 16 bytes, or a length byte
    and that many bytes of name.
    """
    if len(data) < 5:
        return None
    if data[0] != VERSION:
        raise SocksProtocolError(f"not SOCKS5 (version byte {data[0]})")
    command, atyp = data[1], data[3]
    if atyp == AddressType.IPV4:
        start, end = 4, 8
        make: Callable[[bytes], str] = lambda raw: socket.inet_ntop(socket.AF_INET, raw)
    elif atyp == AddressType.IPV6:
        start, end = 4, 20
        make = lambda raw: str(ipaddress.IPv6Address(raw))
    elif atyp == AddressType.DOMAIN:
        start, end = 5, 5 + data[4]
        make = lambda raw: raw.decode("utf-8", "replace")
    else:
        raise SocksProtocolError(
            f"address type {atyp} is not supported", Reply.ADDRESS_TYPE_NOT_SUPPORTED
        )
    if len(data) < end + 2:
        return None
    host = make(bytes(data[start:end]))
    port = int.from_bytes(data[end : end + 2], "big")
    return Request(command, AddressType(atyp), host, port), end + 2


def build_method_selection(method: int) -> bytes:
    """``VER METHOD``: the server's choice of authentication method."""
    return bytes((VERSION, method))


def build_reply(
    reply: Reply, host: str | None = None, port: int = 0, *, name: bool = False
) -> bytes:
    """``VER REP RSV ATYP BND.ADDR BND.PORT``; ``host`` is an address or a name (RESOLVE_PTR).

    Without ``host`` the bound address is 0.0.0.0: clients ignore it on errors, and through the
    cluster the real one is not known. With ``name``, ``host`` is sent as a name (ATYP domain)
    even when it is an address: a RESOLVE_PTR reply must carry a name.
    """
    address = None if name else _ip(host or "0.0.0.0")
    if address is None:
        encoded = (host or "").encode("utf-8")[:255]
        body = bytes((AddressType.DOMAIN, len(encoded))) + encoded
    else:
        atyp = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
        body = bytes((atyp,)) + address.packed
    return bytes((VERSION, reply, 0)) + body + port.to_bytes(2, "big")


# -- helpers ----------------------------------------------------------------------------------


def is_local_name(name: str) -> bool:
    """``localhost`` and names under ``.localhost`` (RFC 6761): never sent to the cluster."""
    name = name.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


@functools.lru_cache(maxsize=1024)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address, ``None`` for a name. Cached: a proxy sees the same few hosts
    over and over, and parsing them was a visible share of each connection's CPU in the
    1,000-connection row (bench/RESULTS.md)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback; ``ValueError`` for a name."""
    ip = _ip(address)
    if ip is None:
        raise ValueError(f"not an IP address: {address!r}")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _literal(host: str) -> str | None:
    ip = _ip(host)
    return None if ip is None else str(ip)


def reply_for(exc: BaseException) -> Reply:
    """The SOCKS reply code that tells the client what went wrong."""
    if isinstance(exc, ResolveError):
        return Reply.HOST_UNREACHABLE
    if isinstance(exc, ConnectionRefusedError):
        return Reply.CONNECTION_REFUSED
    if isinstance(exc, TimeoutError):
        return Reply.TTL_EXPIRED
    if isinstance(exc, OSError):
        if exc.errno == errno.ENETUNREACH:
            return Reply.NETWORK_UNREACHABLE
        if exc.errno == errno.EHOSTUNREACH:
            return Reply.HOST_UNREACHABLE
        # anyio.connect_tcp to a name with several addresses wraps the errors of each attempt.
        cause = exc.__cause__
        if isinstance(cause, BaseExceptionGroup) and all(
            isinstance(e, ConnectionRefusedError) for e in cause.exceptions
        ):
            return Reply.CONNECTION_REFUSED
    return Reply.GENERAL_FAILURE


# -- server -----------------------------------------------------------------------------------


class SocksServer:
    """SOCKS5 (+ Tor RESOLVE) on 127.0.0.1, resolving through the cluster and dialing from it.

    ``port`` 0 picks a free port; :meth:`serve` reports the bound one. ``handshake_timeout``
    bounds how long a client may take to send its greeting and request; ``connect_timeout``
    bounds opening the outbound connection. ``max_connections`` bounds the connections served
    at once (more are reset, see :class:`~tpconf.net.TCPListener`).
    """

    def __init__(
        self,
        resolver: ClusterResolver,
        dialer: Dialer,
        *,
        port: int = 0,
        handshake_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.resolver = resolver
        self.dialer = dialer
        self.port = port
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        #: The listener while :meth:`serve` runs (its counters: refused, exhausted).
        self.listener: TCPListener | None = None
        #: Client connections being served right now.
        self.active = 0
        #: Requests received, by command (``Command.RESOLVE_PTR`` ...): for tests and status.
        self.requests: Counter[int] = Counter()

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``task_status.started(port)`` once bound."""
        try:
            listener = TCPListener.bind(
                "127.0.0.1", self.port, name="SOCKS", max_connections=self.max_connections
            )
        except OSError as exc:
            raise errors.ProxyError(
                f"cannot listen for SOCKS on 127.0.0.1:{self.port}: {exc.strerror or exc}",
                hint="choose another port, or 0 for any free one",
            ) from exc
        async with listener:
            log.debug("SOCKS server listening on 127.0.0.1:%d", listener.port)
            self.listener = listener
            try:
                await listener.serve(self._handle, task_status=task_status)
            finally:
                self.listener = None

    async def _handle(self, client: ByteStream) -> None:
        """One client; the listener closes it and keeps any failure to this connection."""
        self.active += 1
        try:
            await self._session(client)
        finally:
            self.active -= 1

    async def _session(self, client: ByteStream) -> None:
        buffer = b""
        try:
            with anyio.fail_after(self.handshake_timeout):
                greeting, buffer = await _read(client, buffer, parse_greeting)
                if Method.NO_AUTH not in greeting.methods:
                    await client.send(build_method_selection(Method.NO_ACCEPTABLE))
                    return
                await client.send(build_method_selection(Method.NO_AUTH))
                request, buffer = await _read(client, buffer, parse_request)
        except SocksProtocolError as exc:
            log.debug("SOCKS protocol error: %s", exc)
            await client.send(build_reply(exc.reply))
            return
        except (TimeoutError, anyio.EndOfStream, anyio.IncompleteRead):
            return
        self.requests[request.command] += 1
        if request.command == Command.CONNECT:
            await self._connect(client, request, buffer)
        elif request.command == Command.RESOLVE:
            await client.send(await self._resolve(request))
        elif request.command == Command.RESOLVE_PTR:
            await client.send(await self._resolve_ptr(request))
        else:
            await client.send(build_reply(Reply.COMMAND_NOT_SUPPORTED))

    async def _connect(self, client: ByteStream, request: Request, early: bytes) -> None:
        try:
            with anyio.fail_after(self.connect_timeout):
                remote = await self._open(request.host, request.port)
        except Exception as exc:  # noqa: BLE001  (every request gets a reply, an error at worst)
            code = reply_for(exc)
            log.debug("SOCKS CONNECT %s:%d: %s (%s)", request.host, request.port, exc, code.name)
            await client.send(build_reply(code))
            return
        async with remote:
            await client.send(build_reply(Reply.SUCCEEDED))
            if early:  # bytes the client sent right after its request, without waiting
                await remote.send(early)
            await relay(client, remote)

    async def _open(self, host: str, port: int) -> ByteStream:
        literal = _literal(host)
        if literal is None and is_local_name(host):
            return await anyio.connect_tcp("localhost", port)
        addresses = [literal] if literal is not None else await self.resolver.addresses(host)
        last: Exception | None = None
        for address in addresses:
            try:
                if is_loopback(address):
                    return await anyio.connect_tcp(address, port)
                return await self.dialer.dial(address, port)
            except OSError as exc:
                last = exc
        assert last is not None  # addresses() never returns an empty list without raising
        raise last

    async def _resolve(self, request: Request) -> bytes:
        """RESOLVE: one address in BND.ADDR, IPv4 preferred (torsocks asks for IPv4)."""
        host = request.host
        if _literal(host) is not None:
            return build_reply(Reply.SUCCEEDED, host)
        if is_local_name(host):
            return build_reply(Reply.SUCCEEDED, "127.0.0.1")
        return await _first_answer("RESOLVE", host, self.resolver.addresses(host))

    async def _resolve_ptr(self, request: Request) -> bytes:
        """RESOLVE_PTR: the name in BND.ADDR (ATYP domain); loopback is ``localhost``.

        An address without a name is answered with itself, never with an error: torsocks 2.3
        turns an error into a "success" that carries the name of the process's previous reverse
        lookup (measured: ``gethostbyaddr`` of an unknown address returned the earlier address's
        name), and prints an ERROR line on the program's terminal. The address as its own name
        is what torsocks means to return then, and what ``getnameinfo`` gives without a name.
        """
        address = _literal(request.host)
        if address is None:
            return build_reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED)
        if is_loopback(address):
            return build_reply(Reply.SUCCEEDED, "localhost")
        try:
            names = await self.resolver.reverse(address)
        except ResolveError as exc:
            log.debug("SOCKS RESOLVE_PTR %s: %s; answered with the address", address, exc)
            names = []
        return build_reply(Reply.SUCCEEDED, names[0] if names else address, name=True)


async def _first_answer(
    what: str, asked: object, lookup: Coroutine[Any, Any, Sequence[str]]
) -> bytes:
    """The reply to a RESOLVE or RESOLVE_PTR: the lookup's first answer, or why there is none."""
    try:
        answers = await lookup
    except ResolveError as exc:
        log.debug("SOCKS %s %s: %s", what, asked, exc)
        return build_reply(reply_for(exc))
    if not answers:
        return build_reply(Reply.HOST_UNREACHABLE)
    return build_reply(Reply.SUCCEEDED, answers[0])


async def _read(
    stream: ByteStream, buffer: bytes, parse: Callable[[bytes], tuple[_T, int] | None]
) -> tuple[_T, bytes]:
    """Receive until ``parse`` finds a complete message; returns it and the bytes after it."""
    while True:
        parsed = parse(buffer)
        if parsed is not None:
            value, used = parsed
            return value, buffer[used:]
        buffer += await stream.receive()
