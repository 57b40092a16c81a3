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
- ``vpn-tcp``: slot until the vpn-tcp unit can be driven from the bench (root, netns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from bench import client
from bench.client import Route
from bench.context import Bench, Deadline
from bench.core import Row, at_least_ratio, within_ms
from bench.echo import PORT
from bench.procs import kubectl_port_forward, local_echo, tpconf_side
from bench.tuning import PROPOSED

VPN_SLOT = "not measured: needs the vpn-tcp unit (root + netns)"
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
    rows: dict[str, Row],
    routes_: dict[str, Route],
    rounds: int,
    measure: Callable[[Route], float],
    seconds: float,
) -> None:
    deadline = Deadline(seconds)
    for _ in range(rounds):
        if not deadline:
            break
        for variant, row in rows.items():
            row.samples.append(measure(routes_[variant]))


def connection_rtt(bench: Bench, routes_: dict[str, Route]) -> None:
    name = "new conn + 1 RTT"
    rows = {
        v: bench.table.add(Row(name, v, "ms", reference=REF))
        for v in ("loopback", "kubectl-pf", "inject-tcp", "tunnel-only")
    }
    rows["inject-tcp"].target = "<= kubectl-pf + 2 ms"
    rows["inject-tcp"].check = within_ms(2.0)
    for route in routes_.values():  # warm-up: first connection of each path
        client.round_trip(route)
    _interleave(rows, routes_, bench.sizes.rtt_count, lambda r: client.round_trip(r) * 1e3, 120)
    bench.table.slot(name, "vpn-tcp", VPN_SLOT, target="<= kubectl-pf + 2 ms")


def bulk(bench: Bench, routes_: dict[str, Route]) -> None:
    size = bench.sizes.bulk_bytes
    for direction, fn in (("upload", client.upload), ("download", client.download)):
        name = f"bulk {direction} {size // 1_000_000} MB"
        rows = {
            v: bench.table.add(Row(name, v, "MB/s", reference=REF, higher_is_better=True))
            for v in routes_
        }
        for v in ("inject-tcp", "inject-tcp, proposed settings"):
            rows[v].target = ">= 80% of kubectl-pf"
            rows[v].check = at_least_ratio(0.8)
        _interleave(rows, routes_, bench.sizes.bulk_runs, lambda r, f=fn: f(r, size), 900)  # type: ignore[misc]
        bench.table.slot(name, "vpn-tcp", VPN_SLOT, target=">= 80% of kubectl-pf")


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
