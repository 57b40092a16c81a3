"""DnsServer over real UDP and TCP: cluster names via the resolver, the rest to an upstream.

The upstream-mark tests need root: they run the server in a network namespace of their own whose
iptables rule redirects unmarked DNS traffic to a wrong nameserver (``dns_netns_helper.py``).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSRecord

from tests.proxy.fakes import HELLO, HELLO_IP, FakeClock, FakeNameserver, tcp_ask, udp_ask
from tpconf.proxy.dnsserver import DnsServer, reverse_address
from tpconf.proxy.resolver import ClusterResolver
from tpconf.redirect.routing import DNS_UPSTREAM_MARK

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
root = pytest.mark.root
skip_unless_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: network namespaces, iptables, SO_MARK"
)


@dataclass
class Setup:
    port: int
    upstream: FakeNameserver
    cluster: FakeNameserver
    server: DnsServer


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
        yield Setup(port, upstream, nameserver, server)
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


@pytest.mark.parametrize("name", ["hello.", "Hello.Default."])
async def test_a_service_and_service_dot_namespace_are_the_clusters_first(
    dns: Setup, name: str
) -> None:
    with anyio.fail_after(2):
        reply = await udp_ask(dns.port, name)
    assert str(reply.q.qname) == name  # the client's question, its case kept
    assert [(str(rr.rname), str(rr.rdata)) for rr in reply.rr] == [(name, HELLO_IP)]
    assert dns.upstream.questions == []


async def test_other_dotted_names_go_upstream_first_and_to_the_cluster_if_it_has_no_such_name(
    dns: Setup,
) -> None:
    with anyio.fail_after(2):
        reply = await udp_ask(dns.port, "hello.default.svc.")
    assert addresses(reply) == [HELLO_IP]
    assert dns.upstream.questions == [("hello.default.svc.", QTYPE.A)]


async def test_a_public_name_is_not_captured_by_a_cluster_name_it_is_a_prefix_of(
    dns: Setup,
) -> None:
    """Issue 11: dotted names went to the cluster first, with the pod's search list appended,
    so `example.com` was answered by whatever the cluster had as `example.com.<search>`."""
    dns.cluster.add("example.com.cluster.local. 5 IN A 10.96.7.7")
    dns.cluster.add("www.example.com.cluster.local. 5 IN A 10.96.7.8")
    dns.upstream.add("www.example.com. 60 IN A 93.184.216.35")
    with anyio.fail_after(2):
        public = await udp_ask(dns.port, "example.com.")
        www = await udp_ask(dns.port, "www.example.com.")
    assert addresses(public) == ["93.184.216.34"]  # the upstream's: namespace `com` is absent
    assert addresses(www) == ["93.184.216.35"]  # the upstream knows it: the cluster is not asked
    assert dns.cluster.count("www.example.com.cluster.local.") == 0


async def test_name_dot_namespace_of_a_namespace_that_does_not_exist_goes_upstream(
    dns: Setup,
) -> None:
    dns.upstream.add("hello.elsewhere. 60 IN A 192.0.2.8")
    with anyio.fail_after(2):
        reply = await udp_ask(dns.port, "hello.elsewhere.")
    assert addresses(reply) == ["192.0.2.8"]
    assert dns.cluster.count("hello.elsewhere.svc.cluster.local.") == 0


@pytest.mark.parametrize(
    "name",
    [
        ".".join(["a" * 63] * 3) + ".",  # 191 characters: valid, not the cluster's
        "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61 + ".",  # 253: the longest
        "under_score.",
        "-leading-hyphen.",
        "xn--bcher-kva.de.",
    ],
)
async def test_long_and_odd_names_get_an_answer_never_an_error(dns: Setup, name: str) -> None:
    with anyio.fail_after(2):
        reply = await tcp_ask(dns.port, name)
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert str(reply.q.qname).lower() == name.lower()


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
        again_udp = await udp_ask(dns.port, "big.default.svc.cluster.local.")  # reply cache
        again_tcp = await tcp_ask(dns.port, "big.default.svc.cluster.local.")
    assert udp.header.tc == again_udp.header.tc == 1
    assert len(addresses(tcp)) == len(addresses(again_tcp)) == 40


# -- the reply cache --------------------------------------------------------------------------


def query(name: str, qtype: str = "A", *, qid: int = 1, rd: bool = True, edns: int = 0) -> bytes:
    record = DNSRecord(DNSHeader(id=qid, rd=int(rd)), q=DNSRecord.question(name, qtype).q)
    if edns:
        record.add_ar(EDNS0(udp_len=edns))
    return bytes(record.pack())


@pytest.mark.parametrize(
    "name",
    [
        HELLO,
        "hello.",
        "hello.default.",
        "1.1.96.10.in-addr.arpa.",
        "nosuch.default.svc.cluster.local.",
    ],
)
async def test_cached_replies_are_the_replies_built_afresh_with_the_clients_id_and_flags(
    dns: Setup, name: str
) -> None:
    qtype = "SRV" if name.startswith("_") else "PTR" if name.endswith("arpa.") else "A"
    with anyio.fail_after(2):
        await dns.server.answer(query(name, qtype, qid=1))
    for qid, rd, edns in ((2, True, 0), (0xBEEF, False, 1232)):
        packet = query(name, qtype, qid=qid, rd=rd, edns=edns)
        cached = dns.server.cached_reply(packet)
        assert cached is not None
        dns.server._replies.clear()
        assert cached == await dns.server.answer(packet)


async def test_cached_replies_echo_the_question_as_the_client_wrote_it(dns: Setup) -> None:
    with anyio.fail_after(2):
        await udp_ask(dns.port, "hello.default.")
        reply = await udp_ask(dns.port, "HeLLo.DEFAULT.", qid=77)
        fqdn = await udp_ask(dns.port, HELLO.upper(), qid=78)
    assert (reply.header.id, str(reply.q.qname)) == (77, "HeLLo.DEFAULT.")
    assert [(str(rr.rname), str(rr.rdata)) for rr in reply.rr] == [("HeLLo.DEFAULT.", HELLO_IP)]
    assert (fqdn.header.id, str(fqdn.q.qname), addresses(fqdn)) == (78, HELLO.upper(), [HELLO_IP])
    assert dns.cluster.count(HELLO) == 1


async def test_cached_replies_count_their_ttl_down_and_expire_with_the_answer(
    dns: Setup, clock: FakeClock
) -> None:
    ttls = []
    for step in (0, 0.4, 0.7, 1.0, 2.0, 1.5, 0.5):  # the answer lives 5 s
        clock.advance(step)
        with anyio.fail_after(2):
            reply = await udp_ask(dns.port, "hello.")
        ttls.append(reply.rr[0].ttl)
    assert ttls == [5, 4, 3, 2, 0, 5, 4]  # at 5.6 s the cluster was asked again
    assert dns.cluster.count(HELLO) == 2


async def test_a_reply_is_not_reused_once_the_resolver_dropped_its_answer(
    dns: Setup, resolver: ClusterResolver
) -> None:
    with anyio.fail_after(2):
        assert addresses(await udp_ask(dns.port, HELLO)) == [HELLO_IP]
        resolver._cache.clear()
        dns.cluster.zone[(HELLO, QTYPE.A)].clear()
        dns.cluster.add(f"{HELLO} 5 IN A 10.96.1.2")
        assert addresses(await udp_ask(dns.port, HELLO)) == ["10.96.1.2"]


async def test_a_short_name_found_further_down_the_search_list_is_rechecked_when_the_names_before_it_expire(
    dns: Setup, clock: FakeClock
) -> None:
    dns.cluster.add("db.svc.cluster.local. 60 IN A 10.96.7.7")
    with anyio.fail_after(2):
        assert addresses(await udp_ask(dns.port, "db.")) == ["10.96.7.7"]
        dns.cluster.add("db.default.svc.cluster.local. 60 IN A 10.96.8.8")  # created later
        assert addresses(await udp_ask(dns.port, "db.")) == ["10.96.7.7"]  # NXDOMAIN cached
        clock.advance(30)  # the NXDOMAIN of db.default.svc.cluster.local (SOA minimum 30 s)
        assert addresses(await udp_ask(dns.port, "db.")) == ["10.96.8.8"]


async def test_forwarded_answers_are_not_cached(dns: Setup) -> None:
    with anyio.fail_after(2):
        await udp_ask(dns.port, "upstream.example.")
        await udp_ask(dns.port, "upstream.example.")
    assert dns.upstream.count("upstream.example.") == 2


@pytest.mark.parametrize(
    "packet",
    [
        query(HELLO)[:2] + b"\x81\x00" + query(HELLO)[4:],  # a response
        query(HELLO)[:2] + b"\x09\x00" + query(HELLO)[4:],  # opcode NOTIFY
        query(HELLO)[:12] + b"\xc0\x0c",  # a pointer in the question
        query(HELLO)[:-2],  # cut
        b"\x00",
    ],
)
async def test_packets_that_are_not_plain_queries_never_come_from_the_reply_cache(
    dns: Setup, packet: bytes
) -> None:
    with anyio.fail_after(2):
        await dns.server.answer(query(HELLO))
    assert dns.server.cached_reply(query(HELLO, qid=9)) is not None
    assert dns.server.cached_reply(packet) is None


# -- the upstream mark ------------------------------------------------------------------------


async def test_the_upstream_mark_must_be_32_bits(resolver: ClusterResolver) -> None:
    with pytest.raises(ValueError, match="32-bit"):
        DnsServer(resolver, upstream=("127.0.0.1", 53), upstream_mark=1 << 32)


def in_ns(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace whose nat OUTPUT sends unmarked DNS on port 53 to port 5300."""
    ns = f"tpconf-test-dns-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=10)
    try:
        in_ns(ns, "ip", "link", "set", "lo", "up")
        # An address besides 127/8: getaddrinfo(AI_ADDRCONFIG), which anyio uses to bind,
        # finds no IPv4 in a namespace without one.
        in_ns(ns, "ip", "addr", "add", "192.0.2.250/32", "dev", "lo")
        for proto in ("udp", "tcp"):
            in_ns(ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", proto, "--dport", "53",
                  "-m", "mark", "!", "--mark", f"{DNS_UPSTREAM_MARK:#x}",
                  "-j", "REDIRECT", "--to-ports", "5300")  # fmt: skip
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=10)


def run_helper(ns: str, mark: str) -> dict[str, list[object]]:
    out = in_ns(ns, sys.executable, "-m", "tests.proxy.dns_netns_helper", mark)
    result: dict[str, list[object]] = json.loads(out.stdout)
    return result


ASKED = [["upstream.example.", QTYPE.A], ["big.example.", QTYPE.A], ["big.example.", QTYPE.A]]


@root
@skip_unless_root
def test_marked_upstream_queries_get_past_the_dns_redirect(netns: str) -> None:
    result = run_helper(netns, f"{DNS_UPSTREAM_MARK:#x}")
    assert result["udp"] == ["192.0.2.1"]
    assert result["tcp"] == ["198.51.100.0", "198.51.100.1", "198.51.100.2"]  # the TCP retry
    assert result["right"] == ASKED  # UDP, then UDP and TCP for the truncated one
    assert result["wrong"] == []


@root
@skip_unless_root
def test_without_the_mark_upstream_queries_would_be_redirected(netns: str) -> None:
    result = run_helper(netns, "none")  # the control: the rule does catch unmarked queries
    assert result["udp"] == ["192.0.2.66"]
    assert result["tcp"] == ["203.0.113.0", "203.0.113.1", "203.0.113.2"]
    assert (result["right"], result["wrong"]) == ([], ASKED)


@root
@skip_unless_root
def test_without_cap_net_admin_a_marked_server_refuses_to_start() -> None:
    code = (
        "import anyio\n"
        "from tpconf.errors import ProxyError\n"
        "from tpconf.proxy.dnsserver import DnsServer\n"
        "server = DnsServer(None, upstream=('127.0.0.1', 53), upstream_mark=0x54500000)\n"
        "try:\n    anyio.run(server.serve)\n"
        "except ProxyError as e:\n    print(e.render())\n"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         sys.executable, "-c", code],
        check=False, capture_output=True, text=True, timeout=30, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert (
        "cannot mark the DNS server's upstream queries with 0x54500000 (SO_MARK)" in out.stdout
    ), out.stderr
    assert "needs CAP_NET_ADMIN" in out.stdout


def test_reverse_names_parse_to_addresses() -> None:
    assert str(reverse_address("1.1.96.10.in-addr.arpa.")) == "10.96.1.1"
    v6 = "1." + "0." * 29 + "d.f.ip6.arpa."
    assert str(reverse_address(v6)) == "fd00::1"
    assert reverse_address("96.10.in-addr.arpa.") is None
    assert reverse_address("hello.") is None
