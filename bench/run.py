"""The suite: which measurements run, in which order, and what is printed and written."""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from bench import (
    container,
    dns,
    intercept,
    loopback,
    net,
    start,
    startup,
    transport,
    tuning,
    up,
    vpn,
)
from bench.context import FULL, QUICK, Bench
from bench.kube import bench_namespace

OUT = Path(__file__).parent / "out" / "results.json"

Measure = Callable[[Bench], Awaitable[None] | None]


async def _net(bench: Bench) -> None:
    with net.routes(bench) as routes:
        for name, fn in (("rtt", net.connection_rtt), ("bulk", net.bulk)):
            if not bench.only or name in bench.only:
                await anyio.to_thread.run_sync(fn, bench, routes)
        if not bench.only or "concurrency" in bench.only:
            await net.concurrency(bench, routes)
        if not bench.only or "sequential" in bench.only:
            await anyio.to_thread.run_sync(net.sequential, bench, routes)


#: In table order. Adding a row = one function here.
MEASUREMENTS: list[tuple[str, Measure]] = [
    ("net", _net),
    ("dns", dns.dns),
    ("start", start.start),
    ("transport", transport.transport),
    ("startup", startup.startup),
    ("tuning", tuning.tuning),
    ("loopback", loopback.loopback),
    ("up", up.tpconf_up),
    ("reload", up.hot_reload),
    ("volumes", up.volumes),
    ("intercept", intercept.intercept),
    ("container", container.container),
]
GROUPS = {"rtt": "net", "bulk": "net", "concurrency": "net", "sequential": "net"}
#: Measurements with vpn-tcp variants: the laptop namespace (bench.vpn) runs from before the
#: first of them until the last one is done.
VPN_USERS = {"net", "dns"}


def machine() -> dict[str, Any]:
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":")[1].strip()
    except OSError:
        pass
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":")[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def k8s_version() -> str:
    from kubernetes import client

    info = client.VersionApi().get_code()
    return str(info.git_version)


def _start_vpn(bench: Bench, stack: ExitStack) -> None:
    """The vpn-tcp laptop, started now (``tpconf up`` gets ready while the others start)."""
    if os.geteuid() != 0:
        bench.vpn_status = vpn.NEEDS_ROOT
        return
    start = time.monotonic()
    try:
        bench.vpn = stack.enter_context(vpn.vpn_session(bench.ns, bench.sizes.dns_count))
    except Exception as exc:  # noqa: BLE001 - the other variants still run
        traceback.print_exc()
        bench.vpn_status = f"error: {type(exc).__name__}"
        bench.failures.append(f"vpn-tcp laptop: {type(exc).__name__}: {exc}")
    stack.callback(setattr, bench, "vpn", None)
    stack.callback(lambda: bench.meta.__setitem__("vpn_laptop_seconds", _since(start)))


def _since(start: float) -> float:
    return round(time.monotonic() - start, 1)


async def _measure(bench: Bench, name: str, fn: Measure, failures: list[str]) -> None:
    start = time.monotonic()
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    try:
        result = fn(bench)
        if inspect.isawaitable(result):
            await result
    except Exception as exc:  # noqa: BLE001 - the table still prints; exit status says it
        failures.append(f"{name}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        bench.table.slot(name, "ERROR", f"error: {type(exc).__name__}")
    bench.meta.setdefault("seconds", {})[name] = _since(start)


async def run(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.bulk_mb:
        sizes = replace(sizes, bulk_bytes=args.bulk_mb * 1_000_000)
    if args.runs:
        sizes = replace(sizes, bulk_runs=args.runs, tuning_runs=args.runs)
    failures: list[str] = []
    with bench_namespace() as ns:
        bench = Bench(quick=args.quick, sizes=sizes, ns=ns, only=set(args.only or ()))
        bench.meta.update(machine())
        bench.meta["kubernetes"] = k8s_version()
        bench.meta["mode"] = "quick" if args.quick else "full"
        bench.meta["namespace"] = ns.name
        import asyncssh

        bench.meta["asyncssh"] = asyncssh.__version__
        wanted = {GROUPS.get(n, n) for n in bench.only}
        todo = [(n, fn) for n, fn in MEASUREMENTS if not wanted or n in wanted]
        with ExitStack() as laptop:
            if any(n in VPN_USERS for n, _ in todo):
                _start_vpn(bench, laptop)
            for i, (name, fn) in enumerate(todo):
                if not any(n in VPN_USERS for n, _ in todo[i:]):
                    laptop.close()  # the rest of the run on a quiet machine
                await _measure(bench, name, fn, failures)
        bench.meta["total_seconds"] = round(time.monotonic() - bench.started, 1)
    failures += bench.failures
    print(bench.table.render())
    for note in bench.table.notes():
        print(f"  note: {note}")
    out = Path(args.out)
    bench.table.write_json(out, bench.meta)
    if args.markdown:
        markdown = bench.table.render(markdown=True) + "\n"
        await anyio.Path(args.markdown).write_text(markdown)
    print(f"results: {out}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check")
    parser.add_argument(
        "--only",
        action="append",
        help="run only this measurement (repeatable): " + ", ".join(n for n, _ in MEASUREMENTS),
    )
    parser.add_argument("--bulk-mb", type=int, help="override the bulk size (MB)")
    parser.add_argument("--runs", type=int, help="override the bulk/tuning run count")
    parser.add_argument("--out", default=str(OUT), help="results JSON (default bench/out/)")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    return anyio.run(run, args)
