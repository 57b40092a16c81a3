"""vpn-tcp: the transparent proxy, its nat rules and DNS redirect, in network namespaces.

Every test that touches the kernel builds its own pair of namespaces (``client`` runs tpconf's
VPN through ``vpn_netns_helper.py``; ``peer`` is the outside world at the end of a veth), so
the machine's own routing and chains are never touched. Those tests need root and are skipped
without it. The pure parts (route table, also-proxy, rule rendering) run everywhere.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.load.pressure import SMALL_BUFFER, MiB, push
from tpconf.errors import PrivilegeError
from tpconf.redirect.routing import (
    DNS_UPSTREAM_MARK,
    AlsoProxy,
    DnsRedirect,
    RouteTable,
    RuleSet,
    read_nameservers,
    remove_leftovers,
    resolve_also_proxy,
)

HELPER = Path(__file__).with_name("vpn_netns_helper.py")
REPO = Path(__file__).resolve().parents[2]

root = pytest.mark.root
skip_unless_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: network namespaces, iptables, setpriv"
)


# --- pure parts ----------------------------------------------------------------------------


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def test_the_most_specific_range_chooses_the_dialer() -> None:
    table: RouteTable[str] = RouteTable()
    table.set("wide", [net("10.0.0.0/8")], "dialer-wide")
    table.set("narrow", [net("10.96.0.0/12")], "dialer-narrow")
    assert table.lookup("10.96.0.10") == ("narrow", "dialer-narrow")
    assert table.lookup("10.1.2.3") == ("wide", "dialer-wide")
    assert table.lookup("192.168.1.1") is None


def test_a_range_two_deployments_share_stays_routed_when_one_goes_away() -> None:
    table: RouteTable[str] = RouteTable()
    table.set("web", [net("10.96.0.0/12"), net("10.200.0.0/16")], "web-dialer")
    table.set("api", [net("10.96.0.0/12")], "api-dialer")
    assert table.lookup("10.96.0.1") == ("web", "web-dialer")  # the first claim serves
    table.remove("web")
    assert table.lookup("10.96.0.1") == ("api", "api-dialer")
    assert table.networks() == {net("10.96.0.0/12")}
    assert table.owners() == {"api": frozenset({net("10.96.0.0/12")})}


def test_setting_an_owners_ranges_again_replaces_them() -> None:
    table: RouteTable[str] = RouteTable()
    table.set("web", [net("10.1.0.0/16")], "d")
    table.set("web", [net("10.2.0.0/16")], "d")
    assert table.networks() == {net("10.2.0.0/16")}


@pytest.mark.anyio
async def test_also_proxy_turns_names_addresses_and_cidrs_into_ranges() -> None:
    asked: list[str] = []

    async def cluster_resolver(name: str) -> list[str]:
        asked.append(name)
        table = {"db.example.internal": ["10.9.8.7", "10.9.8.8"], "v6only.internal": ["fd00::1"]}
        if name not in table:
            raise OSError(f"NXDOMAIN {name}")
        return table[name]

    result = await resolve_also_proxy(
        [
            "db.example.internal",
            "192.0.2.10",
            "172.16.0.0/12",
            "nosuch.internal",
            "v6only.internal",
        ],
        cluster_resolver,
    )
    assert result == AlsoProxy(
        frozenset(
            {net("10.9.8.7/32"), net("10.9.8.8/32"), net("192.0.2.10/32"), net("172.16.0.0/12")}
        ),
        ("nosuch.internal", "v6only.internal"),
    )
    assert asked == ["db.example.internal", "nosuch.internal", "v6only.internal"]


def test_nameservers_are_read_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\nsearch example.com\nnameserver 127.0.0.53\n"
        "nameserver fe80::1%eth0\nnameserver 10.0.0.2 # office\n"
    )
    assert read_nameservers(conf) == [IPv4Address("127.0.0.53"), IPv4Address("10.0.0.2")]


def test_dns_redirects_come_before_the_loopback_exemption_so_127_0_0_53_works() -> None:
    rules = RuleSet(
        proxy_port=4000,
        networks=frozenset({net("10.96.0.0/12")}),
        exclude=frozenset({net("192.168.49.2/32")}),
        dns=DnsRedirect((IPv4Address("127.0.0.53"),), 5353),
    )
    assert rules.head_rules("T-ROUTES") == [
        f"-m mark --mark {DNS_UPSTREAM_MARK:#x} -j RETURN",
        "-d 127.0.0.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 5353",
        "-d 127.0.0.53/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 5353",
        "-o lo -j RETURN",
        "-d 127.0.0.0/8 -j RETURN",
        "-d 192.168.49.2/32 -j RETURN",
        "-p tcp -j T-ROUTES",
    ]
    assert rules.route_rules() == {"-d 10.96.0.0/12 -p tcp -j REDIRECT --to-ports 4000"}


@root
@skip_unless_root
def test_without_root_vpn_tcp_says_to_use_sudo() -> None:
    code = (
        "from tpconf.redirect.routing import check_privileges\n"
        "from tpconf.errors import PrivilegeError\n"
        "try:\n    check_privileges()\n"
        "except PrivilegeError as e:\n    print(e.render())\n"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         sys.executable, "-c", code],
        check=False, capture_output=True, text=True, timeout=30, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert "vpn-tcp needs root: run `sudo -E tpconf up`, see docs/vpn-tcp.md" in out.stdout, (
        out.stderr
    )
    assert issubclass(PrivilegeError, Exception)


# --- namespaces ----------------------------------------------------------------------------


@dataclass
class Topology:
    client: str
    peer: str


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def in_ns(ns: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def topology() -> Iterator[Topology]:
    """client 10.77.0.1 <-veth-> peer 10.77.0.2; 10.123/16, 10.124/16, 10.125/16 via the peer.

    The peer owns 10.123.0.5, 10.124.0.5 and 10.125.0.7, so a connection that is not
    intercepted is answered "direct"; the client's resolv.conf names the peer as nameserver.
    """
    tag = secrets.token_hex(3)
    topo = Topology(f"tpconf-test-{tag}c", f"tpconf-test-{tag}p")
    etc_netns = Path("/etc/netns")
    created_etc_netns = not etc_netns.exists()
    peer_proc: subprocess.Popen[bytes] | None = None
    try:
        for ns in (topo.client, topo.peer):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        veth_c, veth_p = f"tpc{tag}a", f"tpc{tag}b"
        ip("link", "add", veth_c, "netns", topo.client, "type", "veth",
           "peer", "name", veth_p, "netns", topo.peer)  # fmt: skip
        ip("-n", topo.client, "addr", "add", "10.77.0.1/24", "dev", veth_c)
        ip("-n", topo.client, "link", "set", veth_c, "up")
        ip("-n", topo.peer, "addr", "add", "10.77.0.2/24", "dev", veth_p)
        ip("-n", topo.peer, "link", "set", veth_p, "up")
        for addr in ("10.123.0.5", "10.124.0.5", "10.125.0.7"):
            ip("-n", topo.peer, "addr", "add", f"{addr}/32", "dev", "lo")
        for cidr in ("10.123.0.0/16", "10.124.0.0/16", "10.125.0.0/16"):
            ip("-n", topo.client, "route", "add", cidr, "via", "10.77.0.2")
        (etc_netns / topo.client).mkdir(parents=True)
        (etc_netns / topo.client / "resolv.conf").write_text("nameserver 10.77.0.2\n")
        peer_proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.peer, sys.executable, str(HELPER), "peer"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        assert peer_proc.stdout is not None
        assert json.loads(peer_proc.stdout.readline())["event"] == "ready"
        yield topo
    finally:
        if peer_proc is not None:
            peer_proc.kill()
            peer_proc.communicate()
        for ns in (topo.client, topo.peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(etc_netns / topo.client, ignore_errors=True)
        if created_etc_netns:
            with suppress(OSError):
                etc_netns.rmdir()


class VpnHelper:
    """Drives ``vpn_netns_helper.py vpn`` inside the client namespace."""

    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdout is not None and process.stdin is not None
        self._out = BufferedByteReceiveStream(process.stdout)
        self.dials: list[dict[str, Any]] = []
        self.port = 0

    async def _line(self) -> dict[str, Any]:
        while True:
            with anyio.fail_after(20):
                line = await self._out.receive_until(b"\n", 1 << 20)
            msg: dict[str, Any] = json.loads(line)
            if msg.get("event") == "dial":
                self.dials.append(msg)
            else:
                return msg

    async def command(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        reply = await self._line()
        assert reply["ok"], reply
        return reply

    async def routes(
        self, owner: str, cidrs: Iterable[str], dialer: str, exclude: Iterable[str] = ()
    ) -> None:
        await self.command("routes", owner=owner, cidrs=list(cidrs), dialer=dialer,
                           exclude=list(exclude))  # fmt: skip

    async def collect_dials(self) -> list[tuple[str, str, int]]:
        await self.command("ping")
        return [(d["dialer"], d["host"], d["port"]) for d in self.dials]


@asynccontextmanager
async def vpn_in(ns: str) -> AsyncIterator[VpnHelper]:
    process = await anyio.open_process(
        ["ip", "netns", "exec", ns, sys.executable, str(HELPER), "vpn"], cwd=REPO
    )
    helper = VpnHelper(process)
    try:
        ready = await helper._line()
        assert ready["event"] == "ready", ready
        helper.port = ready["port"]
        yield helper
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.aclose()


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def socket_in(ns: str, kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
    """A socket of namespace ``ns``, made in a short-lived thread that joins it."""
    made: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, kind))
        except BaseException as exc:  # noqa: BLE001 (handed to the calling thread, re-raised)
            made.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


async def connect_in(ns: str, host: str, port: int) -> SocketStream:
    """A TCP connection made by this test process (not a child of tpconf) from ``ns``."""
    sock = socket_in(ns)
    sock.settimeout(5)
    try:
        await anyio.to_thread.run_sync(sock.connect, (host, port))
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return await SocketStream.from_socket(sock)


async def exchange(stream: SocketStream, data: bytes) -> bytes:
    with anyio.fail_after(5):
        await stream.send(data)
        return await stream.receive()


def curl(ns: str, url: str) -> subprocess.CompletedProcess[str]:
    return in_ns(ns, "curl", "-sS", "--max-time", "5", url)


# --- the kernel parts ----------------------------------------------------------------------


@root
@skip_unless_root
@pytest.mark.anyio
async def test_a_process_that_is_no_child_of_tpconf_reaches_a_routed_address_via_its_dialer(
    topology: Topology,
) -> None:
    async with vpn_in(topology.client) as vpn:
        await vpn.routes("web", ["10.123.0.0/16"], "a")
        result = await anyio.to_thread.run_sync(curl, topology.client, "http://10.123.0.5/")
        assert result.stdout == "target-a\n", result.stderr
        assert await vpn.collect_dials() == [("a", "10.123.0.5", 80)]


@root
@skip_unless_root
@pytest.mark.anyio
async def test_an_address_outside_the_routed_ranges_goes_direct_and_never_reaches_a_dialer(
    topology: Topology,
) -> None:
    async with vpn_in(topology.client) as vpn:
        await vpn.routes("web", ["10.123.0.0/16"], "a")
        result = await anyio.to_thread.run_sync(curl, topology.client, "http://10.124.0.5/")
        assert result.stdout == "direct\n", result.stderr
        assert await vpn.collect_dials() == []


@root
@skip_unless_root
@pytest.mark.anyio
async def test_the_api_server_address_is_never_captured_by_a_routed_range(
    topology: Topology,
) -> None:
    async with vpn_in(topology.client) as vpn:
        await vpn.routes("web", ["10.123.0.0/16"], "a", exclude=["10.123.0.5/32"])
        result = await anyio.to_thread.run_sync(curl, topology.client, "http://10.123.0.5/")
        assert result.stdout == "direct\n", result.stderr
        assert await vpn.collect_dials() == []


@root
@skip_unless_root
@pytest.mark.anyio
async def test_changing_the_routes_keeps_established_connections_and_affects_new_ones(
    topology: Topology,
) -> None:
    async with vpn_in(topology.client) as vpn:
        await vpn.routes("web", ["10.123.0.0/16"], "a")
        await vpn.routes("api", ["10.125.0.0/16"], "b")
        to_b = await connect_in(topology.client, "10.125.0.7", 7)
        to_a = await connect_in(topology.client, "10.123.0.5", 7)
        async with to_b, to_a:
            assert await exchange(to_b, b"one") == b"target-b:one"
            assert await exchange(to_a, b"one") == b"target-a:one"

            await vpn.command("remove", owner="web")  # deployment "web" leaves the file
            await vpn.routes("new", ["10.124.0.0/16"], "a")  # another one arrives

            assert await exchange(to_b, b"two") == b"target-b:two"
            # conntrack keeps even the removed range's open connection on the proxy
            assert await exchange(to_a, b"two") == b"target-a:two"
            async with await connect_in(topology.client, "10.123.0.5", 7) as fresh:
                assert await exchange(fresh, b"three") == b"direct:three"
            async with await connect_in(topology.client, "10.125.0.7", 7) as fresh:
                assert await exchange(fresh, b"three") == b"target-b:three"
        assert await vpn.collect_dials() == [
            ("b", "10.125.0.7", 7),
            ("a", "10.123.0.5", 7),
            ("b", "10.125.0.7", 7),
        ]


@root
@skip_unless_root
@pytest.mark.anyio
async def test_half_close_and_bulk_data_pass_through_the_proxy(topology: Topology) -> None:
    size = 128 << 20
    async with vpn_in(topology.client) as vpn:
        await vpn.routes("web", ["10.123.0.0/16"], "a")
        async with await connect_in(topology.client, "10.123.0.5", 7) as stream:
            await stream.send(f"SEND {size}".encode())
            await stream.send_eof()  # the server still answers after our half-close
            got = 0
            start = time.perf_counter()
            with anyio.fail_after(30):
                try:
                    while True:
                        got += len(await stream.receive(1 << 20))
                except anyio.EndOfStream:
                    pass
            elapsed = time.perf_counter() - start
        assert got == size
        print(f"vpn-tcp relay in a netns: {size / elapsed / 1e6:.0f} MB/s")


@root
@skip_unless_root
@pytest.mark.anyio
async def test_an_upload_faster_than_its_destination_reads_is_slowed_down_not_held(
    topology: Topology,
) -> None:
    """Issue 11: the proxy dials before it reads, so anyio's accepted stream (which stops
    reading only when a read has to wait) read a fast upload whole: 5.66 GB in 10 s."""
    async with vpn_in(topology.client) as vpn:
        await vpn.routes("web", ["10.123.0.0/16"], "a")
        before = await vpn.command("memory")
        sock = socket_in(topology.client)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
            sock.settimeout(5)
            await anyio.to_thread.run_sync(sock.connect, ("10.123.0.9", 7))
            sent = await push(sock, seconds=3, limit=1024 * MiB)
            after = await vpn.command("memory")
        assert await vpn.collect_dials() == [("a", "10.123.0.9", 7)]
    assert sent < 64 * MiB, f"{sent / MiB:.0f} MiB went into a destination that does not read"
    growth = after["peak"] - before["rss"]
    assert growth < 32 * MiB, f"the proxy grew by {growth / MiB:.0f} MiB"


def nat_rules(ns: str) -> str:
    return in_ns(ns, "iptables-save", "-t", "nat").stdout


@root
@skip_unless_root
@pytest.mark.anyio
async def test_stopping_removes_tpconf_chains_and_leaves_other_chains_alone(
    topology: Topology,
) -> None:
    in_ns(topology.client, "iptables", "-t", "nat", "-N", "KUBE-TEST")
    in_ns(topology.client, "iptables", "-t", "nat", "-A", "OUTPUT", "-j", "KUBE-TEST")
    async with vpn_in(topology.client) as vpn:
        await vpn.routes("web", ["10.123.0.0/16"], "a")
        rules = nat_rules(topology.client)
        assert "-A OUTPUT -j TPCONF-OUTPUT" in rules
        assert "-A TPCONF-ROUTES -d 10.123.0.0/16 -p tcp -j REDIRECT" in rules
        # tpconf's jump goes first, before kube-proxy's chains
        assert rules.index("-j TPCONF-OUTPUT") < rules.index("-A OUTPUT -j KUBE-TEST")
        await vpn.command("stop")
    rules = nat_rules(topology.client)
    assert "TPCONF" not in rules
    assert "-A OUTPUT -j KUBE-TEST" in rules


@root
@skip_unless_root
@pytest.mark.anyio
async def test_tpconf_down_removes_the_rules_a_killed_session_left(topology: Topology) -> None:
    async with vpn_in(topology.client) as vpn:
        await vpn.routes("web", ["10.123.0.0/16"], "a")
        await vpn.command("dns", on=True)
        vpn.process.send_signal(signal.SIGKILL)
        await vpn.process.wait()
    assert "TPCONF-ROUTES" in nat_rules(topology.client)
    prefix = ["ip", "netns", "exec", topology.client]
    removed = await remove_leftovers(command_prefix=prefix)
    assert removed == {"TPCONF-OUTPUT", "TPCONF-ROUTES"}
    assert "TPCONF" not in nat_rules(topology.client)
    assert await remove_leftovers(command_prefix=prefix) == set()  # idempotent


DNS_QUERY = """
import socket, sys
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"query", (ns, 53))
print(s.recv(100).decode())
"""


@root
@skip_unless_root
@pytest.mark.anyio
async def test_dns_to_the_nameserver_goes_to_the_local_server_but_marked_upstream_does_not(
    topology: Topology,
) -> None:
    def query() -> str:
        result = in_ns(topology.client, sys.executable, "-c", DNS_QUERY)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    async with vpn_in(topology.client) as vpn:
        assert await anyio.to_thread.run_sync(query) == "upstream:query"
        await vpn.command("dns", on=True)  # nameserver read from the namespace's resolv.conf
        assert await anyio.to_thread.run_sync(query) == "local:query"
        reply = await vpn.command("upstream", server="10.77.0.2", payload="fwd")
        assert reply["reply"] == "upstream:fwd"
        await vpn.command("dns", on=False)
        assert await anyio.to_thread.run_sync(query) == "upstream:query"
