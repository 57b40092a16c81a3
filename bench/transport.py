"""Row 5: the byte path under the SSH connection: ``kubectl port-forward`` child vs the
``kubernetes`` client's websocket port-forward (``kubernetes.stream.portforward``).

Per run and transport, a fresh :mod:`bench.side` process: SSH session set-up time (transport
open, then ``open_tunnel``), then bulk up and down through one ``direct-tcpip`` channel (the
side's plain forward, no SOCKS). Transports alternate within each run.
"""

from __future__ import annotations

from bench import client
from bench.client import Route
from bench.context import Bench, Deadline
from bench.core import Row
from bench.procs import tpconf_side

TRANSPORTS = {"kubectl-pf child": "kubectl", "k8s client websocket": "ws"}
REF = "kubectl-pf child"


def transport(bench: Bench) -> None:
    size = bench.sizes.tuning_bytes
    mb = size // 1_000_000
    names = {
        "open": "tunnel: transport open",
        "ssh": "tunnel: SSH handshake+auth",
        "up": f"tunnel: direct-tcpip upload {mb} MB",
        "down": f"tunnel: direct-tcpip download {mb} MB",
    }
    rows = {
        (key, variant): bench.table.add(
            Row(
                name,
                variant,
                "MB/s" if key in ("up", "down") else "ms",
                reference=REF,
                higher_is_better=key in ("up", "down"),
            )
        )
        for key, name in names.items()
        for variant in TRANSPORTS
    }
    deadline = Deadline(600)
    for _ in range(bench.sizes.transport_runs):
        if not deadline:
            break
        for variant, kind in TRANSPORTS.items():
            with tpconf_side(bench.side_config(transport=kind)) as side:
                rows["open", variant].samples.append(side["timings"]["transport_s"] * 1e3)
                rows["ssh", variant].samples.append(side["timings"]["ssh_s"] * 1e3)
                route = Route(("127.0.0.1", side["fwd_port"]))
                client.round_trip(route)
                rows["up", variant].samples.append(client.upload(route, size))
                rows["down", variant].samples.append(client.download(route, size))
    rows[
        "open", "kubectl-pf child"
    ].note = (
        "kubectl start-up until 'Forwarding from'; the websocket variant: API handshake in-process"
    )
