"""Tunnel tuning: the throughput knobs of the tpconf tunnel, each against tpconf's defaults.

One :mod:`bench.side` per variant, all started at once; bulk up and down through the plain
forward (one ``direct-tcpip`` channel, no SOCKS), variants interleaved in each run. Variants
override ``TunnelSettings`` / the cipher preference / the prototype in :mod:`bench.proto`
without editing tpconf.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from bench import client
from bench.client import Route
from bench.context import Bench, Deadline
from bench.core import Row
from bench.echo import PORT
from bench.procs import kubectl_port_forward, tpconf_side

REF = "tpconf defaults"

#: name -> SideConfig overrides.
VARIANTS: dict[str, dict[str, Any]] = {
    REF: {},
    "chacha20-poly1305": {"ciphers": ["chacha20-poly1305@openssh.com"]},
    "window 8 MiB, read_limit 4 MiB": {"window": 8 << 20, "read_limit": 4 << 20},
    "max_packet 256 KiB": {"max_packet": 256 << 10},
    "coalesced writes (proto)": {"coalesce": True},
}

#: The variant measured as "proposed" (RESULTS.md): coalescing + window + max_packet together.
#: max_packet alone was neutral within noise; the proposal to tpconf keeps 32 KiB.
PROPOSED: dict[str, Any] = {
    "window": 8 << 20,
    "read_limit": 4 << 20,
    "max_packet": 256 << 10,
    "coalesce": True,
}
VARIANTS["proposed (all three)"] = PROPOSED
VARIANTS["proposed + k8s client websocket"] = {**PROPOSED, "transport": "ws"}


def tuning(bench: Bench) -> None:
    size = bench.sizes.tuning_bytes
    mb = size // 1_000_000
    with ExitStack() as stack:
        routes = {"bare kubectl-pf": Route(
            stack.enter_context(kubectl_port_forward(bench.ns.name, "svc/echo", PORT))
        )}  # fmt: skip
        for variant, overrides in VARIANTS.items():
            side = stack.enter_context(tpconf_side(bench.side_config(**overrides)))
            routes[variant] = Route(("127.0.0.1", side["fwd_port"]))
        for route in routes.values():
            client.round_trip(route)
        rows: dict[tuple[str, str], Row] = {}
        for direction in ("upload", "download"):
            for variant in routes:
                rows[direction, variant] = bench.table.add(
                    Row(
                        f"tuning: tunnel {direction} {mb} MB",
                        variant,
                        "MB/s",
                        reference=REF,
                        higher_is_better=True,
                    )
                )
        deadline = Deadline(900)
        for _ in range(bench.sizes.tuning_runs):
            if not deadline:
                break
            for direction, fn in (("upload", client.upload), ("download", client.download)):
                for variant, route in routes.items():
                    rows[direction, variant].samples.append(fn(route, size))
