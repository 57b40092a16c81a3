"""Rows 1-4: new connection + round trip, bulk throughput and its CPU, concurrent connections,
10,000 sequential connections.

Variants, measured interleaved (one of each per round):

- ``loopback``: the echo server on 127.0.0.1 (floor);
- ``kubectl-pf``: a bare ``kubectl port-forward svc/echo`` (each connection = a new stream);
- ``inject-tcp``: SOCKS5 CONNECT through ``tpconf.proxy.SocksServer`` → ``Tunnel.dial`` as
  tpconf runs it by default (issue 15): the agent's relay, one stream of tpconf's own
  port-forward (``tpconf.tunnel.spdy``, no kubectl child) → the Service's ClusterIP. The client
  speaks SOCKS5 itself, as torsocks would after its RESOLVE;
- ``inject-tcp, SSH via kubectl (before)``: the same SOCKS server over the data path before
  issue 15: a ``direct-tcpip`` SSH channel through a ``kubectl port-forward`` child;
- ``SOCKS without a tunnel (floor)`` (concurrency row only): the same SOCKS server in the same
  process, dialing the local echo server from this machine: what the SOCKS handshake and relay
  cost per connection before any tunnel;
- ``vpn-tcp``: a process of the "laptop" network namespace (:mod:`bench.vpn`, not a child of
  ``tpconf up``) connects to the Service's ClusterIP; the kernel redirects it (iptables) to
  tpconf's transparent proxy → ``Tunnel.dial`` of the vpn-tcp deployment (a real ``tpconf up``,
  so its defaults: the relay). Timed inside the namespace by :mod:`bench.nsworker` with the same
  client code, in the same interleaved rounds as the others. Without root: ``not measured``.
- ``kubectl-pf in the laptop netns`` (bulk rows, with vpn-tcp): the bare port-forward run in
  that namespace and timed by the same worker, so it crosses the veth and the namespace's NAT
  to the API server as vpn-tcp's tunnel does; the vpn-tcp row's note gives the ratio to it.

**CPU per 100 MB** (bulk rows): CPU seconds (``/proc/PID/stat``, :mod:`bench.cpu`) of *our
process and the port-forward chain on this side*: the bench's tpconf side (or ``tpconf up`` for
vpn-tcp) with every child (a kubectl port-forward, when there is one), against the bare
``kubectl port-forward`` process, per 100 MB moved. The whole machine's CPU per 100 MB (API
server, kubelet, containerd, the agent in the pod) is in each row's note.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial

from bench import client, cpu
from bench.client import Route
from bench.context import Bench, Deadline
from bench.core import Row, at_least_ratio, at_most_ratio
from bench.echo import PORT
from bench.procs import kubectl_port_forward, local_echo, tpconf_side

VPN = "vpn-tcp"
REF = "kubectl-pf"
INJECT = "inject-tcp"
BEFORE = "inject-tcp, SSH via kubectl (before)"
FLOOR = "SOCKS without a tunnel (floor)"
NS_REF = "kubectl-pf in the laptop netns"


@dataclass
class Routes:
    """Everything rows 1-4 connect through, and whose CPU counts for each variant."""

    routes: dict[str, Route]
    roots: dict[str, int] = field(default_factory=dict)
    """Variant -> the process whose tree is "our process + the port-forward chain"."""
    side_pid: int = 0
    """The default inject-tcp side (RSS and fds of the sequential row)."""
    ns_ref_port: int = 0
    """The port of :data:`NS_REF` in the laptop namespace (0: no vpn-tcp laptop)."""

    def pids(self, variant: str) -> list[int]:
        root = self.roots.get(variant)
        return cpu.descendants(root) if root else []


@contextmanager
def routes(bench: Bench) -> Iterator[Routes]:
    """Start every variant's processes once."""
    with ExitStack() as stack:
        loop = stack.enter_context(local_echo())
        pf_pids: list[int] = []
        pf = stack.enter_context(kubectl_port_forward(bench.ns.name, "svc/echo", PORT, pf_pids))
        side = stack.enter_context(tpconf_side(bench.side_config(transport="inproc")))
        before = stack.enter_context(tpconf_side(bench.side_config(transport="kubectl")))
        bench.meta["side_cipher"] = side["cipher"]
        bench.meta["side_relay"] = side["relay"]
        if not side["relay"]:
            bench.failures.append("the inject-tcp side runs without the relay (agent image?)")
        target = (bench.ns.echo_ip, PORT)
        out = Routes(
            {
                "loopback": Route(loop),
                REF: Route(pf),
                INJECT: Route(("127.0.0.1", side["socks_port"]), target),
                BEFORE: Route(("127.0.0.1", before["socks_port"]), target),
                FLOOR: Route(("127.0.0.1", side["local_socks_port"]), loop),
            },
            roots={REF: pf_pids[0], INJECT: side["pid"], BEFORE: before["pid"]},
            side_pid=side["pid"],
        )
        vpn = bench.vpn_ready()  # started before the others (bench.run): overlaps their start
        if vpn is not None:
            bench.meta["vpn_up_ready_seconds"] = vpn.ready_seconds
            out.roots[VPN] = vpn.up.pid
            # The same bare port-forward, run in the laptop namespace: vpn-tcp's path crosses
            # the veth and the namespace's NAT to reach the API server, the host's does not.
            ns_pids: list[int] = []
            _, out.ns_ref_port = stack.enter_context(
                kubectl_port_forward(
                    bench.ns.name,
                    "svc/echo",
                    PORT,
                    ns_pids,
                    prefix=["ip", "netns", "exec", vpn.laptop.netns],
                    config=vpn.laptop.kubeconfig,
                )
            )
            out.roots[NS_REF] = ns_pids[0]
        yield out


def _interleave(
    bench: Bench,
    rows: dict[str, Row],
    rounds: int,
    measure: Callable[[str], float],
    seconds: float,
) -> None:
    """``rounds`` rounds, one sample per variant each. A failing vpn-tcp sample ends that
    variant only (its row says the error; the run fails); other errors end the measurement."""
    deadline = Deadline(seconds)
    active = dict(rows)
    for _ in range(rounds):
        if not deadline:
            break
        for variant, row in list(active.items()):
            try:
                row.samples.append(measure(variant))
            except Exception as exc:
                if variant not in (VPN, NS_REF):
                    raise
                bench.failures.append(f"{row.name} / {variant}: {exc}")
                row.samples.clear()
                row.status = f"error: {type(exc).__name__}"
                del active[variant]


def _vpn_row(bench: Bench, rows: dict[str, Row], row: Row) -> None:
    """The vpn-tcp row: measured with the others if the laptop is up, else a slot saying why."""
    if bench.vpn is not None:
        rows[VPN] = bench.table.add(row)
    else:
        bench.table.slot(row.name, VPN, bench.vpn_status or "not measured", target=row.target)


def _rtt(bench: Bench, routes_: Routes, variant: str) -> float:
    if variant == VPN:
        assert bench.vpn is not None and bench.vpn.worker is not None
        return bench.vpn.worker.value("rtt", host=bench.ns.echo_ip, port=PORT) * 1e3
    return client.round_trip(routes_.routes[variant]) * 1e3


def connection_rtt(bench: Bench, routes_: Routes) -> None:
    name = "new conn + 1 RTT"
    target = "<= 1.0x kubectl-pf"
    rows = {
        v: bench.table.add(Row(name, v, "ms", reference=REF))
        for v in ("loopback", REF, INJECT, BEFORE)
    }
    rows[INJECT].target, rows[INJECT].check = target, at_most_ratio(1.0)
    _vpn_row(
        bench, rows, Row(name, VPN, "ms", reference=REF, target=target, check=at_most_ratio(1.0))
    )
    for variant in rows:  # warm-up: first connection of each path
        _rtt(bench, routes_, variant)
    measure = partial(_rtt, bench, routes_)
    _interleave(bench, rows, bench.sizes.rtt_count, measure, 120)


@dataclass
class _Bulk:
    """One direction's rows: throughput, and CPU per 100 MB of our side of the path."""

    bench: Bench
    routes: Routes
    direction: str
    cpu_rows: dict[str, Row]
    machine: dict[str, list[float]] = field(default_factory=dict)

    def measure(self, variant: str) -> float:
        size = self.bench.sizes.bulk_bytes
        pids = self.routes.pids(variant)
        before_all, before = cpu.snapshot(), cpu.snapshot(pids)
        if variant in (VPN, NS_REF):
            vpn = self.bench.vpn
            assert vpn is not None and vpn.worker is not None
            host, port = (
                (self.bench.ns.echo_ip, PORT)
                if variant == VPN
                else ("127.0.0.1", self.routes.ns_ref_port)
            )
            rate = vpn.worker.value(self.direction, 600, host=host, port=port, size=size)
        else:
            fn = client.upload if self.direction == "upload" else client.download
            rate = fn(self.routes.routes[variant], size)
        after, after_all = cpu.snapshot(pids), cpu.snapshot()
        per_100mb = 100e6 / size
        if variant in self.cpu_rows:
            self.cpu_rows[variant].samples.append(cpu.by_pid(before, after, pids) * per_100mb)
            total = sum(cpu.spent(before_all, after_all).values()) * per_100mb
            self.machine.setdefault(variant, []).append(total)
        return rate


def bulk(bench: Bench, routes_: Routes) -> None:
    size = bench.sizes.bulk_bytes
    variants = ("loopback", REF, INJECT, BEFORE)
    for direction in ("upload", "download"):
        name = f"bulk {direction} {size // 1_000_000} MB"
        target = ">= 0.9x kubectl-pf"
        rows = {
            v: bench.table.add(Row(name, v, "MB/s", reference=REF, higher_is_better=True))
            for v in variants
        }
        rows[INJECT].target, rows[INJECT].check = target, at_least_ratio(0.9)
        vpn_row = Row(name, VPN, "MB/s", reference=REF, higher_is_better=True, target=target)
        vpn_row.check = at_least_ratio(0.9)
        _vpn_row(bench, rows, vpn_row)
        if VPN in rows and routes_.ns_ref_port:
            rows[NS_REF] = bench.table.add(
                Row(name, NS_REF, "MB/s", reference=REF, higher_is_better=True)
            )
        cpu_name = f"CPU s per 100 MB, {direction}: ours + port-forward chain"
        cpu_target = "<= 1.5x kubectl-pf"
        cpu_rows = {
            v: bench.table.add(Row(cpu_name, v, "s", reference=REF))
            for v in (REF, INJECT, BEFORE, *((VPN,) if VPN in rows else ()))
        }
        for v in (INJECT, VPN):
            if v in cpu_rows:
                cpu_rows[v].target, cpu_rows[v].check = cpu_target, at_most_ratio(1.5)
        measure = _Bulk(bench, routes_, direction, cpu_rows)
        _interleave(bench, rows, bench.sizes.bulk_runs, measure.measure, 900)
        vpn_rate = rows[VPN].median if VPN in rows else None
        ns_rate = rows[NS_REF].median if NS_REF in rows else None
        if vpn_rate and ns_rate:
            same_path = f"{vpn_rate / ns_rate:.2f}x {NS_REF}"
            rows[VPN].note = f"{same_path} (the same namespace crossing on both paths)"
        for variant, totals in measure.machine.items():
            totals.sort()
            cpu_rows[variant].note = (
                f"whole machine {totals[len(totals) // 2]:.2f} s per 100 MB (API server, kubelet,"
                " containerd, the agent, the echo server, the client included)"
            )
            cpu_rows[variant].extra["machine_s_per_100mb"] = totals


async def concurrency(bench: Bench, routes_: Routes) -> None:
    count = bench.sizes.concurrent
    name = f"{count} concurrent conns"
    for variant in ("loopback", INJECT, BEFORE, FLOOR):
        result = await client.concurrent(routes_.routes[variant], count, timeout=60)
        lat = sorted(x * 1e3 for x in result.latencies)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
        row = bench.table.add(Row(name, f"{variant} latency", "ms", samples=lat))
        row.reference = "loopback latency"
        row.note = (
            f"completed {len(lat)}/{count}, failed {result.failed} {result.errors or ''},"
            f" p50 {row.median or float('nan'):.1f} ms, p99 {p99:.1f} ms, wall {result.wall:.2f} s"
        )
        row.extra = {"completed": len(lat), "failed": result.failed, "p99_ms": p99}
        if variant == INJECT:
            row.target = "all complete, p50 <= 1.5x loopback"
            ratio = at_most_ratio(1.5)
            row.check = lambda r, ref, n=count, ok=ratio: (
                int(r.extra["completed"]) == n and ok(r, ref)
            )


def _rss_fds(pid: int) -> tuple[float, int]:
    """(VmRSS in MB, open descriptors) of ``pid``."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def sequential(bench: Bench, routes_: Routes) -> None:
    """Many connections one after the other through inject-tcp: the side's RSS and fds after
    them against before them (after a warm-up of 1 % of them, at least 100)."""
    count = bench.sizes.sequential
    name = f"{count} sequential conns (inject-tcp)"
    route, pid = routes_.routes[INJECT], routes_.side_pid
    for _ in range(max(100, count // 100)):
        client.round_trip(route)
    time.sleep(0.5)
    rss0, fds0 = _rss_fds(pid)
    start = time.monotonic()
    for _ in range(count):
        client.round_trip(route)
    elapsed = time.monotonic() - start
    time.sleep(1.0)  # the last connections' close frames
    rss1, fds1 = _rss_fds(pid)
    rss = bench.table.add(Row(name, "RSS of tpconf after - before", "MB", samples=[rss1 - rss0]))
    rss.target, rss.check = "back at baseline (< 2 MB)", lambda r, _ref: (r.median or 0) < 2.0
    rss.note = f"{rss0:.1f} MB before, {rss1:.1f} MB after; {count / elapsed:.0f} conn/s"
    fds = bench.table.add(Row(name, "fds of tpconf after - before", "", samples=[fds1 - fds0]))
    fds.target, fds.check = "back at baseline (0)", lambda r, _ref: r.median == 0
    fds.note = f"{fds0} before, {fds1} after"
