"""Row 6: from "apply" to SSH connected, split into the cluster's time and tpconf's own.

Each run creates a fresh agent pod (the Secret is shared), with a watch already open:

- cluster: pod create call → pod seen Ready (scheduling, sandbox, container start);
- tpconf: Ready → ``kubectl port-forward`` forwarding → SSH connected (tpconf's real
  ``run_tunnel`` with ``port_forward_transport``, retries and back-off included) → pod info read.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio

from bench.context import Bench, Deadline
from bench.core import Row, below
from bench.kube import ReadyWatcher, agent_pod
from tpconf.tunnel import (
    Endpoint,
    PortForwardTarget,
    Transport,
    fetch_pod_info,
    port_forward_transport,
    run_tunnel,
)


def _marking(inner: Transport, marks: dict[str, float]) -> Transport:
    """``inner``, noting when it first yields (the port-forward is up)."""

    @asynccontextmanager
    async def transport() -> AsyncIterator[Endpoint]:
        async with inner() as endpoint:
            marks.setdefault("pf", time.monotonic())
            yield endpoint

    return transport


async def startup(bench: Bench) -> None:
    name = "apply -> SSH connected"
    variants = (
        "cluster: create -> Ready",
        "tpconf: Ready -> port-forward up",
        "tpconf: port-forward -> SSH up",
        "tpconf: SSH up -> pod info read",
        "tpconf total: Ready -> pod info",
    )
    rows = {v: bench.table.add(Row(name, v, "ms")) for v in variants}
    total = rows["tpconf total: Ready -> pod info"]
    total.target = "< 1500 ms (tpconf up after pod Ready)"
    total.check = below(1500.0)
    cfg = bench.side_config()
    deadline = Deadline(300)
    for run in range(bench.sizes.startup_runs):
        if not deadline:
            break
        pod = f"agent-start-{run}"
        watcher = ReadyWatcher(bench.ns, pod)
        created = time.monotonic()
        await anyio.to_thread.run_sync(bench.ns.create_pod, agent_pod(pod, "agent-keys"))
        await anyio.to_thread.run_sync(watcher.event.wait, 120.0)
        if watcher.ready_at is None:
            raise RuntimeError(f"pod {pod} not Ready")
        ready = watcher.ready_at
        marks: dict[str, float] = {}
        inner = port_forward_transport(
            PortForwardTarget(
                namespace=cfg.namespace,
                resource=f"pod/{pod}",
                kubectl=cfg.kubectl,
                kubeconfig=cfg.kubeconfig,
            )
        )

        transport = _marking(inner, marks)
        async with anyio.create_task_group() as tg:
            tunnel = await tg.start(
                partial(run_tunnel, transport, bench.ns.keys.credentials("tpconf"))
            )
            marks["ssh"] = time.monotonic()
            await fetch_pod_info(tunnel)
            marks["info"] = time.monotonic()
            tg.cancel_scope.cancel()
        rows[variants[0]].samples.append((ready - created) * 1e3)
        rows[variants[1]].samples.append((marks["pf"] - ready) * 1e3)
        rows[variants[2]].samples.append((marks["ssh"] - marks["pf"]) * 1e3)
        rows[variants[3]].samples.append((marks["info"] - marks["ssh"]) * 1e3)
        total.samples.append((marks["info"] - ready) * 1e3)
        await anyio.to_thread.run_sync(bench.ns.delete_pod, pod)
    total.note = (
        "the agent has no readiness probe: Ready = container started; sshd may need ~0.1 s more,"
        " which tpconf's retry (0.2 s back-off) absorbs"
    )
