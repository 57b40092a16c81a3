"""DnsServer over real UDP and TCP: cluster names via the resolver, the rest to an upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from tests.proxy.fakes import HELLO, HELLO_IP, FakeNameserver, tcp_ask, udp_ask
from tpconf.proxy.dnsserver import DnsServer, reverse_address
from tpconf.proxy.resolver import ClusterResolver

pytestmark = pytest.mark.anyio


@dataclass
class Setup:
    port: int
    upstream: FakeNameserver
    cluster: FakeNameserver


@pytest.fixture
async def dns(resolver: ClusterResolver, nameserver: FakeNameserver) -> AsyncIterator[Setup]:
    upstream = FakeNameserver()
    upstream.add("upstream.example. 60 IN A 192.0.2.7")
    async with anyio.create_task_group() as tg:
        udp_port = await tg.start(upstream.serve_udp)
        server = DnsServer(
            resolver,
            upstream=("127.0.0.1", udp_port),
            reverse_networks=["10.96.0.0/12"],
            timeout=0.5,
        )
        port = await tg.start(server.serve)
        yield Setup(port, upstream, nameserver)
        tg.cancel_scope.cancel()


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]


@pytest.mark.parametrize("ask", [udp_ask, tcp_ask])
async def test_cluster_domain_names_are_answered_by_the_cluster(dns: Setup, ask: object) -> None:
    with anyio.fail_after(2):
        reply = await ask(dns.port, HELLO, qid=99)  # type: ignore[operator]
    assert reply.header.id == 99
    assert str(reply.q.qname) == HELLO
    assert addresses(reply) == [HELLO_IP]
    assert dns.upstream.questions == []


@pytest.mark.parametrize("name", ["hello.", "Hello.Default.", "hello.default.svc."])
async def test_short_names_are_expanded_with_the_pods_search_list(dns: Setup, name: str) -> None:
    with anyio.fail_after(2):
        reply = await udp_ask(dns.port, name)
    assert str(reply.q.qname) == name  # the client's question, its case kept
    assert [(str(rr.rname), str(rr.rdata)) for rr in reply.rr] == [(name, HELLO_IP)]
    assert dns.upstream.questions == []


async def test_srv_records_of_services(dns: Setup) -> None:
    with anyio.fail_after(2):
        reply = await udp_ask(dns.port, "_http._tcp.hello.default.", "SRV")
    assert [str(rr.rdata) for rr in reply.rr] == [f"0 100 80 {HELLO}"]


async def test_a_cluster_name_without_this_type_gets_an_empty_answer(dns: Setup) -> None:
    with anyio.fail_after(2):
        reply = await udp_ask(dns.port, "hello.", "AAAA")
    assert (reply.header.rcode, reply.rr) == (RCODE.NOERROR, [])
    assert dns.upstream.questions == []


async def test_missing_cluster_domain_names_are_nxdomain_from_the_cluster(dns: Setup) -> None:
    with anyio.fail_after(2):
        reply = await tcp_ask(dns.port, "nosuch.default.svc.cluster.local.")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert dns.upstream.questions == []


@pytest.mark.parametrize("ask", [udp_ask, tcp_ask])
async def test_other_names_are_forwarded_upstream(dns: Setup, ask: object) -> None:
    with anyio.fail_after(2):
        reply = await ask(dns.port, "upstream.example.", qid=1234)  # type: ignore[operator]
    assert reply.header.id == 1234
    assert addresses(reply) == ["192.0.2.7"]
    assert dns.upstream.questions == [("upstream.example.", QTYPE.A)]


async def test_reverse_names_of_routed_networks_go_to_the_cluster(dns: Setup) -> None:
    with anyio.fail_after(2):
        cluster = await udp_ask(dns.port, "1.1.96.10.in-addr.arpa.", "PTR")
        other = await udp_ask(dns.port, "7.2.0.192.in-addr.arpa.", "PTR")
    assert [str(rr.rdata) for rr in cluster.rr] == [HELLO]
    assert other.header.rcode == RCODE.NXDOMAIN
    assert dns.upstream.questions == [("7.2.0.192.in-addr.arpa.", QTYPE.PTR)]


async def test_a_silent_cluster_gets_the_client_servfail_not_a_hang(dns: Setup) -> None:
    dns.cluster.drop.add("silent.cluster.local.")
    with anyio.fail_after(2):
        reply = await udp_ask(dns.port, "silent.cluster.local.", qid=7)
    assert (reply.header.id, reply.header.rcode) == (7, RCODE.SERVFAIL)


async def test_a_silent_upstream_gets_the_client_servfail_not_a_hang(dns: Setup) -> None:
    dns.upstream.drop.add("slow.example.")
    with anyio.fail_after(2):
        reply = await tcp_ask(dns.port, "slow.example.")
    assert reply.header.rcode == RCODE.SERVFAIL


async def test_short_names_still_resolve_upstream_when_the_cluster_is_silent(dns: Setup) -> None:
    dns.upstream.add("printer. 60 IN A 192.0.2.9")
    for domain in ("default.svc.cluster.local.", "svc.cluster.local.", "cluster.local."):
        dns.cluster.drop.add("printer." + domain)
    with anyio.fail_after(2):
        reply = await udp_ask(dns.port, "printer.")
    assert addresses(reply) == ["192.0.2.9"]


async def test_malformed_packets_get_formerr_and_the_server_keeps_going(dns: Setup) -> None:
    async with await anyio.create_connected_udp_socket("127.0.0.1", dns.port) as sock:
        await sock.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff")  # cut question
        with anyio.fail_after(2):
            reply = await sock.receive()
    assert reply[:2] == b"\x12\x34"
    assert reply[3] & 0x0F == RCODE.FORMERR
    with anyio.fail_after(2):
        assert addresses(await udp_ask(dns.port, HELLO)) == [HELLO_IP]


async def test_large_answers_are_truncated_over_udp_and_complete_over_tcp(dns: Setup) -> None:
    for i in range(40):
        dns.cluster.add(f"big.default.svc.cluster.local. 5 IN A 10.96.3.{i}")
    with anyio.fail_after(2):
        udp = await udp_ask(dns.port, "big.default.svc.cluster.local.")
        tcp = await tcp_ask(dns.port, "big.default.svc.cluster.local.")
    assert udp.header.tc == 1
    assert len(addresses(tcp)) == 40


def test_reverse_names_parse_to_addresses() -> None:
    assert str(reverse_address("1.1.96.10.in-addr.arpa.")) == "10.96.1.1"
    v6 = "1." + "0." * 29 + "d.f.ip6.arpa."
    assert str(reverse_address(v6)) == "fd00::1"
    assert reverse_address("96.10.in-addr.arpa.") is None
    assert reverse_address("hello.") is None
