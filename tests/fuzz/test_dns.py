"""Fuzzing DNS: the local DNS server's ``answer()``, and the resolver against a hostile nameserver.

``answer()`` gets any bytes and any question (names of any characters and lengths, any type):
it returns a reply carrying the query's ID, or nothing (a packet too short to answer, or a
response sent to us), and never raises. The resolver asks a nameserver that answers garbage,
cut or wrong-ID or wrong-question responses, random records, or nothing: it returns an answer or
raises a :class:`~tpconf.proxy.resolver.ResolveError`, within its timeout, and never logs a
traceback.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.from_thread import BlockingPortal
from anyio.streams.buffered import BufferedByteReceiveStream
from dnslib import RR, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ
from tests.proxy.fakes import POD_NAMESERVER, POD_SEARCH, FakeNameserver, MapDialer
from tpconf.net import TCPListener
from tpconf.proxy.dnsserver import DnsServer
from tpconf.proxy.resolver import Answer, ClusterResolver, ResolveError

pytestmark = pytest.mark.timeout(300)

labels = st.one_of(
    st.from_regex(r"[a-z0-9_-]{1,63}", fullmatch=True),
    st.text(min_size=1, max_size=70),  # unicode, controls, dots, over-long
)
names = st.lists(labels, min_size=1, max_size=6).map(".".join)
qtypes = st.one_of(st.sampled_from([1, 28, 33, 12, 16, 5, 255, 6]), st.integers(0, 65535))


def _query(qid: int, name: str, qtype: int) -> bytes:
    """A query as a client may send it: labels as UTF-8 bytes, cut to 63, whatever they hold."""
    encoded = b"".join(
        bytes((len(raw),)) + raw
        for raw in (label.encode()[:63] or b"x" for label in name.split("."))
    )
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
        + encoded
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


@asynccontextmanager
async def dns_server() -> AsyncIterator[DnsServer]:
    cluster, upstream = FakeNameserver(), FakeNameserver()
    async with anyio.create_task_group() as tg:
        await tg.start(cluster.serve_tcp)
        upstream_port = await tg.start(upstream.serve_udp)
        dialer = MapDialer(routes={(POD_NAMESERVER, 53): ("127.0.0.1", cluster.port)})
        async with ClusterResolver(
            dialer, [POD_NAMESERVER], POD_SEARCH, ndots=5, timeout=1
        ) as resolver:
            yield DnsServer(
                resolver,
                upstream=("127.0.0.1", upstream_port),
                reverse_networks=["10.96.0.0/12"],
                timeout=1,
            )
            tg.cancel_scope.cancel()


@pytest.fixture(scope="module")
def server(portal: BlockingPortal) -> Iterator[DnsServer]:
    with portal.wrap_async_context_manager(dns_server()) as server:
        yield server


def _check_reply(query: bytes, reply: bytes | None) -> None:
    if reply is None:
        assert len(query) < 12 or query[2] & 0x80  # nothing to answer, or a response
        return
    assert reply[:2] == query[:2]
    assert reply[2] & 0x80  # a response
    DNSRecord.parse(reply)  # well-formed


@FUZZ
@given(st.binary(max_size=300))
def test_answer_replies_to_any_bytes_or_drops_them_and_never_raises(
    portal: BlockingPortal, server: DnsServer, data: bytes
) -> None:
    for tcp in (False, True):
        _check_reply(data, portal.call(partial(server.answer, data, tcp=tcp)))


@FUZZ
@given(st.integers(0, 0xFFFF), names, qtypes)
def test_answer_replies_to_any_question_with_its_id(
    portal: BlockingPortal, server: DnsServer, qid: int, name: str, qtype: int
) -> None:
    query = _query(qid, name, qtype)
    reply = portal.call(server.answer, query)
    _check_reply(query, reply)
    assert reply is not None


# ---- the resolver against a hostile nameserver ------------------------------------------------

records = st.one_of(
    st.builds(lambda ip: f"A {ip}", st.ip_addresses(v=4)),
    st.builds(lambda ip: f"AAAA {ip}", st.ip_addresses(v=6)),
    st.builds(
        lambda n: f"CNAME {n}.", st.from_regex(r"[a-z]{1,10}(\.[a-z]{1,10}){0,3}", fullmatch=True)
    ),
    st.just('TXT "hello"'),
    st.just("SOA ns. host. 1 2 3 4 5"),
)


@dataclass
class Hostility:
    """What the hostile nameserver does with each query."""

    owner: str | None
    """Answer records under this name (``None``: the question's)."""
    rrs: list[str]
    ttl: int
    rcode: int
    flips: list[tuple[int, int]]
    """(position, byte) changes made to the packed reply."""
    cut: int | None
    """Send only this many bytes of the reply, then close."""
    prefix_delta: int
    """Added to the length prefix (a lie about the reply's size)."""
    qid_delta: int
    garbage: bytes | None
    """Send this instead of a reply."""
    silent: bool = False


hostilities = st.builds(
    Hostility,
    owner=st.one_of(st.none(), st.just("other.example.")),
    rrs=st.lists(records, max_size=4),
    ttl=st.integers(0, 2**31 - 1),
    rcode=st.sampled_from([0, 0, 0, 2, 3, 5, 15]),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3),
    cut=st.one_of(st.none(), st.integers(0, 60)),
    prefix_delta=st.sampled_from([0, 0, 0, 1, -1, 500]),
    qid_delta=st.sampled_from([0, 0, 0, 1]),
    garbage=st.one_of(st.none(), st.none(), st.binary(max_size=100)),
    silent=st.just(False),  # silence costs the whole timeout: tested once, below
)


@dataclass
class HostileNameserver:
    hostility: Hostility | None = None
    port: int = 0
    served: list[bytes] = field(default_factory=list)

    def respond(self, query: bytes) -> bytes | None:
        how = self.hostility
        assert how is not None
        if how.silent:
            return None
        if how.garbage is not None:
            return how.garbage
        request = DNSRecord.parse(query)
        reply = request.reply()
        reply.header.id = (request.header.id + how.qid_delta) & 0xFFFF
        reply.header.rcode = how.rcode
        owner = how.owner or str(request.q.qname)
        for rr in how.rrs:
            reply.add_answer(*RR.fromZone(f"{owner} {how.ttl} IN {rr}"))
        data = bytearray(reply.pack())
        for position, value in how.flips:
            if position < len(data):
                data[position] = value
        return bytes(data)

    async def handle(self, stream: SocketStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        try:
            while True:
                size = int.from_bytes(await reader.receive_exactly(2), "big")
                query = await reader.receive_exactly(size)
                self.served.append(query)
                reply = self.respond(query)
                if reply is None:
                    continue
                how = self.hostility
                assert how is not None
                prefix = max(0, min(0xFFFF, len(reply) + how.prefix_delta)).to_bytes(2, "big")
                data = prefix + reply
                await stream.send(data if how.cut is None else data[: how.cut])
                if how.cut is not None:
                    return
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            pass


@asynccontextmanager
async def hostile() -> AsyncIterator[HostileNameserver]:
    nameserver = HostileNameserver()
    listener = TCPListener.bind("127.0.0.1", 0, name="hostile nameserver")
    async with listener, anyio.create_task_group() as tg:
        nameserver.port = await tg.start(listener.serve, nameserver.handle)
        yield nameserver
        tg.cancel_scope.cancel()


@pytest.fixture(scope="module")
def nameserver(portal: BlockingPortal) -> Iterator[HostileNameserver]:
    with portal.wrap_async_context_manager(hostile()) as nameserver:
        yield nameserver


async def _resolve(
    nameserver: HostileNameserver, ask: Callable[[ClusterResolver], object]
) -> object:
    dialer = MapDialer(routes={(POD_NAMESERVER, 53): ("127.0.0.1", nameserver.port)})
    async with ClusterResolver(
        dialer, [POD_NAMESERVER], POD_SEARCH, ndots=5, timeout=0.4, attempts=2
    ) as resolver:
        with anyio.fail_after(3):  # the resolver's timeout is 0.4 s: an answer or an error
            try:
                return await ask(resolver)  # type: ignore[misc]
            except ResolveError as exc:
                return exc


@FUZZ
@given(hostilities, st.sampled_from(["hello", "hello.default", "x.cluster.local."]), qtypes)
def test_the_resolver_answers_or_fails_cleanly_whatever_the_nameserver_sends(
    portal: BlockingPortal,
    nameserver: HostileNameserver,
    caplog: pytest.LogCaptureFixture,
    how: Hostility,
    name: str,
    qtype: int,
) -> None:
    nameserver.hostility = how
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = portal.call(_resolve, nameserver, lambda r: r.resolve(name, qtype))
    assert isinstance(result, Answer | ResolveError), result
    if isinstance(result, Answer):
        assert result.name.endswith(".")
        result.values()  # readable
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_a_silent_nameserver_is_a_timeout_not_a_hang(
    portal: BlockingPortal, nameserver: HostileNameserver
) -> None:
    nameserver.hostility = Hostility(None, [], 0, 0, [], None, 0, 0, None, silent=True)
    result = portal.call(_resolve, nameserver, lambda r: r.resolve("hello", "A"))
    assert isinstance(result, ResolveError)
    assert nameserver.served  # it was asked, and said nothing
