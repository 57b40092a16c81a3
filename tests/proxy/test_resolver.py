"""ClusterResolver against a real DNS-over-TCP server on loopback, reached through a dialer."""

from __future__ import annotations

import anyio
import pytest
from dnslib import QTYPE, RCODE, DNSHeader, DNSRecord

from tests.proxy.fakes import (
    HELLO,
    HELLO_IP,
    POD_NAMESERVER,
    POD_SEARCH,
    FakeClock,
    FakeNameserver,
    MapDialer,
)
from tpconf.proxy.resolver import (
    ClusterResolver,
    NameNotFound,
    NoRecords,
    ResolveTimeout,
    ServerFailure,
    SrvTarget,
    host_name,
)

pytestmark = pytest.mark.anyio


def make_resolver(
    dialer: MapDialer, clock: FakeClock, *, timeout: float = 1.0, stall: float = 0.05
) -> ClusterResolver:
    return ClusterResolver(
        dialer, [POD_NAMESERVER], POD_SEARCH, ndots=5, clock=clock, timeout=timeout, stall=stall
    )


def test_search_list_is_tried_first_for_names_with_fewer_than_ndots_dots() -> None:
    resolver = ClusterResolver(MapDialer(), [POD_NAMESERVER], POD_SEARCH, ndots=5)
    assert resolver.candidates("hello") == [
        "hello.default.svc.cluster.local.",
        "hello.svc.cluster.local.",
        "hello.cluster.local.",
        "hello.",
    ]
    # Four dots are still fewer than ndots:5: the search list comes first even for the FQDN.
    assert resolver.candidates("Hello.Default.svc.cluster.local")[0] == (
        "hello.default.svc.cluster.local.default.svc.cluster.local."
    )
    assert resolver.candidates("hello.default.svc.cluster.local")[-1] == HELLO


def test_a_trailing_dot_makes_a_name_absolute_and_ndots_puts_it_first() -> None:
    resolver = ClusterResolver(MapDialer(), [POD_NAMESERVER], POD_SEARCH, ndots=2)
    assert resolver.candidates("hello.") == ["hello."]
    assert resolver.candidates("a.b.c") == [
        "a.b.c.",
        "a.b.c.default.svc.cluster.local.",
        "a.b.c.svc.cluster.local.",
        "a.b.c.cluster.local.",
    ]


@pytest.mark.parametrize(
    "name", ["hello", "hello.default", "hello.default.svc", HELLO.rstrip("."), HELLO]
)
async def test_service_names_resolve_with_the_pods_search_list(
    resolver: ClusterResolver, name: str
) -> None:
    answer = await resolver.resolve(name)
    assert answer.name == HELLO
    assert answer.values() == [HELLO_IP]
    assert await resolver.addresses(name) == [HELLO_IP]


async def test_an_absolute_name_costs_one_query(
    resolver: ClusterResolver, nameserver: FakeNameserver
) -> None:
    assert await resolver.addresses(HELLO) == [HELLO_IP]
    assert nameserver.questions == [(HELLO, QTYPE.A)]


async def test_srv_records_of_a_service(resolver: ClusterResolver) -> None:
    assert await resolver.srv("_http._tcp.hello.default") == [
        SrvTarget(priority=0, weight=100, port=80, target=HELLO.rstrip("."))
    ]


async def test_reverse_lookup_of_a_cluster_address(resolver: ClusterResolver) -> None:
    assert await resolver.reverse(HELLO_IP) == [HELLO.rstrip(".")]


async def test_ipv6_only_names_fall_back_to_aaaa(resolver: ClusterResolver) -> None:
    assert await resolver.addresses("hello6.default") == ["fd00::1"]


async def test_nxdomain_nodata_and_servfail_are_told_apart(
    resolver: ClusterResolver, nameserver: FakeNameserver
) -> None:
    with pytest.raises(NameNotFound):
        await resolver.resolve("nosuch")
    with pytest.raises(NoRecords):
        await resolver.resolve("hello", "AAAA")
    nameserver.servfail.add("broken.default.svc.cluster.local.")
    with pytest.raises(ServerFailure):
        await resolver.resolve("broken")


async def test_a_nameserver_that_does_not_answer_times_out_quickly(
    dialer: MapDialer, clock: FakeClock, nameserver: FakeNameserver
) -> None:
    nameserver.drop.add("silent.default.svc.cluster.local.")
    async with make_resolver(dialer, clock, timeout=0.3) as resolver:
        with anyio.fail_after(2), pytest.raises(ResolveTimeout):
            await resolver.resolve("silent")
        # The connection the silent query was stuck on was replaced: others still work.
        assert await resolver.addresses("hello") == [HELLO_IP]


async def test_an_unreachable_nameserver_is_a_timeout_error_not_a_hang(clock: FakeClock) -> None:
    async with make_resolver(MapDialer(), clock, timeout=0.5) as resolver:
        with anyio.fail_after(2), pytest.raises(ResolveTimeout, match="refused|nothing listens"):
            await resolver.resolve("hello")


async def test_answers_are_cached_for_their_ttl(
    resolver: ClusterResolver, nameserver: FakeNameserver, clock: FakeClock
) -> None:
    await resolver.resolve(HELLO)
    await resolver.resolve(HELLO)
    assert nameserver.count(HELLO) == 1
    clock.advance(4.9)
    await resolver.resolve(HELLO)
    assert nameserver.count(HELLO) == 1
    clock.advance(0.2)  # the record's TTL is 5 s
    await resolver.resolve(HELLO)
    assert nameserver.count(HELLO) == 2


async def test_a_service_created_after_a_miss_is_found_once_the_negative_ttl_expires(
    resolver: ClusterResolver, nameserver: FakeNameserver, clock: FakeClock
) -> None:
    with pytest.raises(NameNotFound):
        await resolver.resolve("late")
    nameserver.add("late.default.svc.cluster.local. 5 IN A 10.96.2.2")
    with pytest.raises(NameNotFound):  # still the cached miss
        await resolver.resolve("late")
    clock.advance(5.1)  # the SOA says 30 s; the resolver caps misses at 5 s
    assert await resolver.addresses("late") == ["10.96.2.2"]


async def test_concurrent_identical_questions_share_one_query(
    resolver: ClusterResolver, nameserver: FakeNameserver
) -> None:
    nameserver.delays[HELLO] = 0.1
    results: list[list[str]] = []

    async def lookup() -> None:
        results.append(await resolver.addresses(HELLO))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(lookup)
    assert results == [[HELLO_IP]] * 20
    assert nameserver.count(HELLO) == 1


async def test_one_connection_carries_many_queries(
    resolver: ClusterResolver, nameserver: FakeNameserver, dialer: MapDialer
) -> None:
    for i in range(30):
        with pytest.raises(NameNotFound):
            await resolver.resolve(f"missing-{i}.")
    assert nameserver.connections == 1
    assert dialer.calls == [(POD_NAMESERVER, 53)]


async def test_queries_survive_the_server_closing_connections(
    resolver: ClusterResolver, nameserver: FakeNameserver
) -> None:
    nameserver.close_after = 3  # CoreDNS closes after 128 queries, or when idle
    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(resolver.query, f"n{i}.example.", "A")
    for i in range(10, 20):
        answer = await resolver.query(f"n{i}.example.", "A")
        assert answer.rcode == RCODE.NXDOMAIN
    assert nameserver.connections >= 4


async def test_a_slow_query_does_not_hold_back_the_next_one(
    dialer: MapDialer, clock: FakeClock, nameserver: FakeNameserver
) -> None:
    # CoreDNS answers one connection's queries in order; a name it forwards upstream is slow.
    nameserver.delays["slow.example."] = 0.6
    slow_done = anyio.Event()

    async def slow() -> None:
        await resolver.query("slow.example.", "A")
        slow_done.set()

    async with (
        make_resolver(dialer, clock, timeout=2.0, stall=0.02) as resolver,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(slow)
        await anyio.sleep(0.05)
        assert await resolver.addresses(HELLO) == [HELLO_IP]
        assert not slow_done.is_set()  # answered on another connection, not behind it
    assert nameserver.connections == 2


async def test_a_caller_that_gives_up_still_fills_the_cache(
    resolver: ClusterResolver, nameserver: FakeNameserver
) -> None:
    nameserver.delays[HELLO] = 0.1
    with anyio.move_on_after(0.01):
        await resolver.resolve(HELLO)
    with anyio.fail_after(1):
        while resolver.cached(HELLO, "A") is None:  # noqa: ASYNC110  (no event to wait on)
            await anyio.sleep(0.01)
    await resolver.resolve(HELLO)
    assert nameserver.count(HELLO) == 1


async def test_raw_queries_of_any_type_pass_through_with_their_id(
    resolver: ClusterResolver,
) -> None:
    query = DNSRecord(DNSHeader(id=777, rd=1), q=DNSRecord.question("Example.COM", "TXT").q)
    reply = DNSRecord.parse(await resolver.exchange(bytes(query.pack())))
    assert reply.header.id == 777
    assert str(reply.q.qname) == "Example.COM."
    assert [str(rr.rdata) for rr in reply.rr] == ['"v=spf1 -all"']


async def test_invalid_names_are_not_found_rather_than_crashing(
    resolver: ClusterResolver,
) -> None:
    with pytest.raises(NameNotFound):
        await resolver.resolve("x" * 70 + ".example.")
    with pytest.raises(NameNotFound):
        await resolver.reverse("not-an-address")


@pytest.mark.parametrize(
    "name",
    [
        ".".join(["a" * 63] * 4),  # 255 characters: longer than any name can be
        "a" * 64,  # a label over 63 octets
        "sp ace",
        "-leading-hyphen",
        "a..b",
        "\x00x",
        "é" * 60,  # IDNA cannot encode it into one label
    ],
)
async def test_names_no_nameserver_can_have_are_nxdomain_at_once_without_asking(
    resolver: ClusterResolver,
    nameserver: FakeNameserver,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with anyio.fail_after(1), pytest.raises(NameNotFound):
        await resolver.addresses(name)
    assert nameserver.questions == []
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


async def test_an_idn_name_is_asked_in_its_idna_form(
    resolver: ClusterResolver, nameserver: FakeNameserver
) -> None:
    nameserver.add("xn--bcher-kva.default.svc.cluster.local. 5 IN A 10.96.4.4")
    with anyio.fail_after(2):
        assert await resolver.addresses("bücher") == ["10.96.4.4"]
        assert await resolver.addresses("Bücher.default.svc.cluster.local.") == ["10.96.4.4"]


def test_host_names_are_checked_and_made_absolute_ascii() -> None:
    assert host_name("Hello.Default") == "hello.default."
    assert host_name("_http._tcp.hello.") == "_http._tcp.hello."
    assert host_name("bücher.de") == "xn--bcher-kva.de."
    assert host_name("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61) is not None
    for bad in ("", ".", "a..b", "a" * 64, "x-", "a b", "a/b", "a" * 63 + ("." + "a" * 63) * 3):
        assert host_name(bad) is None, bad
