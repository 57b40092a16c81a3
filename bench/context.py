"""What every measurement gets: the mode's sizes, the namespace, the table, the deadline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.core import Table
from bench.kube import KUBECTL, BenchNamespace, kubeconfig
from bench.side import SideConfig

if TYPE_CHECKING:
    from bench.vpn import VpnSession


@dataclass(frozen=True)
class Sizes:
    rtt_count: int
    """Round trips per variant."""
    bulk_bytes: int
    bulk_runs: int
    concurrent: int
    sequential: int
    """Connections one after the other through inject-tcp (RSS and fds back at baseline)."""
    dns_count: int
    startup_runs: int
    transport_runs: int
    tuning_bytes: int
    tuning_runs: int
    up_counts: tuple[int, ...]
    """Deployments per ``tpconf up`` start-up row."""
    up_runs: int
    reload_edits: int
    volume_bytes: int
    volume_runs: int
    loopback_bytes: int
    """Bytes each way per loopback tunnel sample (a multiple of 256 KiB)."""
    loopback_runs: int


FULL = Sizes(
    rtt_count=60,
    bulk_bytes=200 * 1000 * 1000,
    bulk_runs=3,
    concurrent=1000,
    sequential=10_000,
    dns_count=50,
    startup_runs=5,
    transport_runs=3,
    tuning_bytes=100 * 1000 * 1000,
    tuning_runs=3,
    up_counts=(1, 3, 10),
    up_runs=5,
    reload_edits=5,
    volume_bytes=50 * 1000 * 1000,
    volume_runs=5,
    loopback_bytes=16 << 20,
    loopback_runs=3,
)
QUICK = Sizes(
    rtt_count=5,
    bulk_bytes=2 * 1000 * 1000,
    bulk_runs=1,
    concurrent=50,
    sequential=200,
    dns_count=5,
    startup_runs=1,
    transport_runs=1,
    tuning_bytes=1 * 1000 * 1000,
    tuning_runs=1,
    up_counts=(1,),
    up_runs=1,
    reload_edits=1,
    volume_bytes=5 * 1000 * 1000,
    volume_runs=1,
    loopback_bytes=1 << 20,
    loopback_runs=1,
)


@dataclass
class Bench:
    quick: bool
    sizes: Sizes
    ns: BenchNamespace
    table: Table = field(default_factory=Table)
    started: float = field(default_factory=time.monotonic)
    meta: dict[str, Any] = field(default_factory=dict)
    only: set[str] = field(default_factory=set)
    """Measurement names to run (empty: all)."""
    vpn: VpnSession | None = None
    """The vpn-tcp laptop (:mod:`bench.vpn`) while the net and DNS rows run, if it could start."""
    vpn_status: str = ""
    """Why the vpn-tcp rows are not measured (when :attr:`vpn` is None)."""
    failures: list[str] = field(default_factory=list)
    """Errors that did not stop a measurement but must fail the run."""

    def vpn_ready(self) -> VpnSession | None:
        """The vpn-tcp session once ``tpconf up`` is ready; None (and :attr:`vpn_status`) if not."""
        if self.vpn is None:
            return None
        try:
            self.vpn.wait_ready()
        except Exception as exc:  # noqa: BLE001 - the other variants still run
            self.vpn_status = f"error: {type(exc).__name__}"
            self.failures.append(f"vpn-tcp: {type(exc).__name__}: {exc}")
            self.vpn = None
        return self.vpn

    def side_config(self, **overrides: Any) -> SideConfig:
        """How to start :mod:`bench.side` against the bench's agent pod."""
        keys = self.ns.keys
        cfg = SideConfig(
            namespace=self.ns.name,
            pod=self.ns.agent,
            username="tpconf",
            client_key=keys.client_private_key,
            host_key=keys.host_public_key,
            fwd_target=(self.ns.echo_ip, 7000),
            kubectl=KUBECTL,
            kubeconfig=kubeconfig(),
        )
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg


def bounded(count: int, seconds: float) -> range:
    """``range(count)``; callers also check :func:`time_left` (every loop is bounded twice)."""
    del seconds
    return range(count)


class Deadline:
    """A time bound for one loop."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def __bool__(self) -> bool:
        return time.monotonic() < self.end
