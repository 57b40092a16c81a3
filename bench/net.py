"""Rows 1-3: new connection + round trip, bulk throughput, concurrent connections.

Variants, measured interleaved (one of each per round):

- ``loopback``: the echo server on 127.0.0.1 (floor);
- ``kubectl-pf``: a bare ``kubectl port-forward svc/echo`` (each connection = a new stream);
- ``inject-tcp``: SOCKS5 CONNECT through ``tpconf.proxy.SocksServer`` → ``tpconf.tunnel``
  (``direct-tcpip``) → ``kubectl port-forward`` to the agent pod → the Service's ClusterIP.
  The client speaks SOCKS5 itself, as torsocks would after its RESOLVE;
- ``inject-tcp, proposed settings``: the same with the tunnel settings proposed in
  RESULTS.md (:data:`bench.tuning.PROPOSED`; bulk rows only);
- ``tunnel-only``: the same tunnel without SOCKS (a local forward = one ``direct-tcpip`` channel
  per connection), to separate the SOCKS relay's cost from the tunnel's;
- ``vpn-tcp``: a process of the "laptop" network namespace (:mod:`bench.vpn`, not a child of
  ``tpconf up``) connects to the Service's ClusterIP; the kernel redirects it (iptables) to
  tpconf's transparent proxy → one ``direct-tcpip`` channel on the vpn-tcp deployment's tunnel.
  Timed inside the namespace by :mod:`bench.nsworker` with the same client code, in the same
  interleaved rounds as the others. Without root: ``not measured: needs root``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

from bench import client
from bench.client import Route
from bench.context import Bench, Deadline
from bench.core import Row, at_least_ratio, within_ms
from bench.echo import PORT
from bench.procs import kubectl_port_forward, local_echo, tpconf_side
from bench.tuning import PROPOSED

VPN = "vpn-tcp"
REF = "kubectl-pf"


@contextmanager
def routes(bench: Bench) -> Iterator[dict[str, Route]]:
    """Everything rows 1-3 connect through, started once."""
    with ExitStack() as stack:
        loop = stack.enter_context(local_echo())
        pf = stack.enter_context(kubectl_port_forward(bench.ns.name, "svc/echo", PORT))
        side = stack.enter_context(tpconf_side(bench.side_config()))
        tuned = stack.enter_context(tpconf_side(bench.side_config(**PROPOSED)))
        bench.meta["side_cipher"] = side["cipher"]
        vpn = bench.vpn_ready()  # started before the others (bench.run): overlaps their start
        if vpn is not None:
            bench.meta["vpn_up_ready_seconds"] = vpn.ready_seconds
        yield {
            "loopback": Route(loop),
            "kubectl-pf": Route(pf),
            "inject-tcp": Route(("127.0.0.1", side["socks_port"]), (bench.ns.echo_ip, PORT)),
            "tunnel-only": Route(("127.0.0.1", side["fwd_port"])),
            "inject-tcp, proposed settings": Route(
                ("127.0.0.1", tuned["socks_port"]), (bench.ns.echo_ip, PORT)
            ),
        }


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
                if variant != VPN:
                    raise
                bench.failures.append(f"{row.name} / {VPN}: {exc}")
                row.samples.clear()
                row.status = f"error: {type(exc).__name__}"
                del active[variant]


def _vpn_row(bench: Bench, rows: dict[str, Row], row: Row) -> None:
    """The vpn-tcp row: measured with the others if the laptop is up, else a slot saying why."""
    if bench.vpn is not None:
        rows[VPN] = bench.table.add(row)
    else:
        bench.table.slot(row.name, VPN, bench.vpn_status or "not measured", target=row.target)


def _rtt(bench: Bench, routes_: dict[str, Route], variant: str) -> float:
    if variant == VPN:
        assert bench.vpn is not None and bench.vpn.worker is not None
        return bench.vpn.worker.value("rtt", host=bench.ns.echo_ip, port=PORT) * 1e3
    return client.round_trip(routes_[variant]) * 1e3


def _bulk(bench: Bench, routes_: dict[str, Route], variant: str, direction: str) -> float:
    size = bench.sizes.bulk_bytes
    if variant == VPN:
        assert bench.vpn is not None and bench.vpn.worker is not None
        worker = bench.vpn.worker
        return worker.value(direction, 600, host=bench.ns.echo_ip, port=PORT, size=size)
    fn = client.upload if direction == "upload" else client.download
    return fn(routes_[variant], size)


def connection_rtt(bench: Bench, routes_: dict[str, Route]) -> None:
    name = "new conn + 1 RTT"
    rows = {
        v: bench.table.add(Row(name, v, "ms", reference=REF))
        for v in ("loopback", "kubectl-pf", "inject-tcp", "tunnel-only")
    }
    target = "<= kubectl-pf + 2 ms"
    rows["inject-tcp"].target = target
    rows["inject-tcp"].check = within_ms(2.0)
    _vpn_row(bench, rows, Row(name, VPN, "ms", reference=REF, target=target, check=within_ms(2)))
    for variant in rows:  # warm-up: first connection of each path
        _rtt(bench, routes_, variant)
    measure = partial(_rtt, bench, routes_)
    _interleave(bench, rows, bench.sizes.rtt_count, measure, 120)


def bulk(bench: Bench, routes_: dict[str, Route]) -> None:
    size = bench.sizes.bulk_bytes
    target = ">= 80% of kubectl-pf"
    for direction in ("upload", "download"):
        name = f"bulk {direction} {size // 1_000_000} MB"
        rows = {
            v: bench.table.add(Row(name, v, "MB/s", reference=REF, higher_is_better=True))
            for v in routes_
        }
        for v in ("inject-tcp", "inject-tcp, proposed settings"):
            rows[v].target = target
            rows[v].check = at_least_ratio(0.8)
        vpn_row = Row(name, VPN, "MB/s", reference=REF, higher_is_better=True, target=target)
        vpn_row.check = at_least_ratio(0.8)
        _vpn_row(bench, rows, vpn_row)
        measure = partial(_bulk, bench, routes_, direction=direction)
        _interleave(bench, rows, bench.sizes.bulk_runs, measure, 900)


async def concurrency(bench: Bench, routes_: dict[str, Route]) -> None:
    count = bench.sizes.concurrent
    name = f"{count} concurrent conns"
    for variant in ("loopback", "inject-tcp"):
        result = await client.concurrent(routes_[variant], count, timeout=60)
        lat = sorted(x * 1e3 for x in result.latencies)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
        row = bench.table.add(Row(name, f"{variant} latency", "ms", samples=lat))
        row.reference = "loopback latency"
        row.note = (
            f"completed {len(lat)}/{count}, failed {result.failed} {result.errors or ''},"
            f" p50 {row.median or float('nan'):.1f} ms, p99 {p99:.1f} ms, wall {result.wall:.2f} s"
        )
        row.extra = {"completed": len(lat), "failed": result.failed, "p99_ms": p99}
        row.target = "all complete"
        row.check = lambda r, _ref, n=count: int(r.extra["completed"]) == n
