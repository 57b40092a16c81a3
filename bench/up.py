"""Rows 7-9: ``tpconf up`` start-up, hot reload and volumes, on a real ``tpconf up`` child.

Everything runs in the bench namespace (deleted at the end) through :mod:`bench.uphost`.

- **start-up** (1/3/10 ``new`` deployments, inject-tcp, ``run: sleep 3600``, ``volumes: false``,
  runs interleaved by size): ``t0`` = just before the child is spawned; per deployment the
  Deployment's first watch event (*created*), its pod's first Ready event (*pod Ready*) and its
  ``NAME ready`` line. *cluster time* = first created → last pod Ready; *tpconf time* = the rest
  of start → all ready (= start → first created + last pod Ready → last ready line).
- **hot reload**: ``a`` (``echo $$ >> a.pids; exec sleep``) and ``b`` (one TCP connection through
  inject-tcp to the echo Service, a ping every 100 ms, each logged with its monotonic time);
  each edit changes a's ``run`` (atomic rename); save → a's new pid line (polled every 2 ms).
  b survives if its pid and connection are unchanged, nothing but ``a: process`` is replanned,
  and no ping fails; its row is the longest gap between two pings during an edit.
- **volumes**: one ``new`` deployment with volumes on; per run a fresh file of random bytes in
  the agent pod (no cache on either side), copied to a local file through
  ``$TELEPRESENCE_ROOT`` (sshfs) and with ``kubectl cp``, alternating which goes first.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio

from bench.context import Bench, Deadline
from bench.core import Row, below
from bench.echo import PORT
from bench.kube import kubectl
from bench.uphost import ClusterWatch, UpProcess, running_up, write_config

UP_TARGET = "ready < 1.5 s after pod Ready"
AGENT_CONTAINER = "tpconf-agent"


def _config(ns: str, deployments: dict[str, dict[str, object]]) -> str:
    """telepresence.yaml (JSON is YAML)."""
    return json.dumps({"version": 1, "namespace": ns, "deployments": deployments}, indent=2)


def _sleeper() -> dict[str, object]:
    return {"new": True, "method": "inject-tcp", "volumes": False, "run": "sleep 3600"}


# --- start-up -----------------------------------------------------------------------------


def _up_rows(bench: Bench, n: int) -> dict[str, Row]:
    name = f"tpconf up, {n} deployment{'s' if n > 1 else ''}"
    rows = {
        v: bench.table.add(Row(name, v, unit))
        for v, unit in (
            ("start -> all ready", "ms"),
            ("cluster time", "ms"),
            ("tpconf time", "ms"),
            ("tpconf: start -> 1st Deployment created", "ms"),
            ("tpconf: pod Ready -> ready (slowest)", "ms"),
            ("parallel: 1st -> last Deployment created", "ms"),
            ("peak RSS, tpconf process", "MB"),
            ("peak RSS, + children (sum)", "MB"),
        )
    }
    slowest = rows["tpconf: pod Ready -> ready (slowest)"]
    slowest.target, slowest.check = "< 1500 ms", below(1500.0)
    spread = rows["parallel: 1st -> last Deployment created"]
    if n > 1:
        spread.target, spread.check = "N in parallel (< 500 ms)", below(500.0)
    return rows


def _one_up(bench: Bench, watcher: ClusterWatch, names: list[str], rows: dict[str, Row]) -> None:
    config = _config(bench.ns.name, {name: _sleeper() for name in names})
    with running_up(config) as up:
        ready = {name: up.wait_line(rf"^{name} ready$", 180) for name in names}
        own, family = up.peak_rss_mb()
        created = {name: watcher.created[name] for name in names}
        deadline = time.monotonic() + 5  # the Ready event can trail the line by a few ms
        while not all(n in watcher.ready for n in names) and time.monotonic() < deadline:
            time.sleep(0.01)
        pod_ready = {name: watcher.ready[name] for name in names}
    t0, first, last_ready = up.started, min(created.values()), max(pod_ready.values())
    total = max(ready.values()) - t0
    cluster = last_ready - first
    rows["start -> all ready"].samples.append(total * 1e3)
    rows["cluster time"].samples.append(cluster * 1e3)
    rows["tpconf time"].samples.append((total - cluster) * 1e3)
    rows["tpconf: start -> 1st Deployment created"].samples.append((first - t0) * 1e3)
    rows["tpconf: pod Ready -> ready (slowest)"].samples.append(
        max(ready[n] - pod_ready[n] for n in names) * 1e3
    )
    rows["parallel: 1st -> last Deployment created"].samples.append(
        (max(created.values()) - first) * 1e3
    )
    rows["peak RSS, tpconf process"].samples.append(own)
    rows["peak RSS, + children (sum)"].samples.append(family)
    if not bench.quick:
        watcher.wait_gone(set(names), 60)


def _up_all(bench: Bench) -> None:
    counts = bench.sizes.up_counts
    rows = {n: _up_rows(bench, n) for n in counts}
    watcher = ClusterWatch(bench.ns)
    deadline = Deadline(900)
    try:
        for run in range(bench.sizes.up_runs):
            for n in counts:
                if not deadline:
                    break
                names = [f"u{run}n{n}d{i}" for i in range(n)]
                _one_up(bench, watcher, names, rows[n])
    finally:
        watcher.close()
    for n in counts:
        r = rows[n]["peak RSS, + children (sum)"]
        r.note = "VmHWM of tpconf + each live descendant (kubectl port-forward, sh, sleep) at ready"
        if n > 1:
            r.note = ""


async def tpconf_up(bench: Bench) -> None:
    """``tpconf up`` for 1/3/10 deployments: ready time split cluster/tpconf, peak memory."""
    await anyio.to_thread.run_sync(_up_all, bench)


# --- hot reload -------------------------------------------------------------------------------

ECHO_CLIENT = """\
import os, socket, sys, time
open("b.pid", "a").write(f"{os.getpid()}\\n")
log = open("b.log", "a", buffering=1)
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(b"E")
n = 0
while True:
    t = time.monotonic()
    try:
        c.sendall(b"ping")
        got = b""
        while len(got) < 4:
            data = c.recv(4 - len(got))
            if not data:
                raise ConnectionError("closed by peer")
            got += data
        assert got == b"ping", got
    except Exception as exc:
        log.write(f"broken {exc!r}\\n")
        raise
    n += 1
    log.write(f"ok {n} {time.monotonic():.6f} {(time.monotonic() - t) * 1e3:.3f}\\n")
    time.sleep(0.1)
"""


def _reload_config(ns: str, version: int) -> str:
    return _config(
        ns,
        {
            "a": {
                "new": True,
                "method": "inject-tcp",
                "volumes": False,
                "run": f"sh -c 'echo \"$$$$ v{version}\" >> a.pids; exec sleep 3600'",
            },
            "b": {
                "new": True,
                "method": "inject-tcp",
                "volumes": False,
                "run": [sys.executable, "b_client.py", "echo", str(PORT)],
            },
        },
    )


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _wait(check: Callable[[], object], timeout: float, what: str, poll: float = 0.002) -> float:
    """Poll ``check()`` until true; return when it became true."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic()


def _contains(path: Path, text: str) -> bool:
    return text in _text(path)


def _pings(project: Path) -> list[float]:
    return [
        float(m) for m in re.findall(r"^ok \d+ ([\d.]+)", _text(project / "b.log"), re.MULTILINE)
    ]


def _reload(bench: Bench) -> None:
    name = "hot reload (run change)"
    target = "< 500 ms; other deployment untouched"
    save = bench.table.add(Row(name, "save -> new process", "ms", target=target))
    save.check = below(500.0)
    conn = bench.table.add(Row(name, "unrelated conn: longest ping gap", "ms", target=target))
    ns = bench.ns.name

    def prepare(project: Path) -> None:
        (project / "b_client.py").write_text(ECHO_CLIENT)

    with running_up(_reload_config(ns, 0), prepare) as up:
        project = up.project
        up.wait_line(r"^a ready$", 120)
        up.wait_line(r"^b ready$", 120)
        _wait(lambda: "v0" in _text(project / "a.pids"), 30, "a's first process", 0.01)
        _wait(lambda: len(_pings(project)) >= 5, 30, "b's round trips", 0.01)
        b_pid = _text(project / "b.pid")
        mark = up.mark()
        gaps: list[float] = []
        for edit in range(1, bench.sizes.reload_edits + 1):
            time.sleep(0.5)  # b pings, a settles
            saved = write_config(project, _reload_config(ns, edit))
            marker = f" v{edit}\n"
            started = _wait(partial(_contains, project / "a.pids", marker), 30, "a's new process")
            save.samples.append((started - saved) * 1e3)
            time.sleep(0.5)
            pings = [t for t in _pings(project) if t >= saved - 0.2]
            gaps.append(max(b - a for a, b in itertools.pairwise(pings)) * 1e3)
        time.sleep(0.3)
        changes = re.findall(r"^[-+~] (\S+): (\S+)", "\n".join(up.output(mark)), re.MULTILINE)
        others = [c for c in changes if c != ("a", "process")]
        broken = "broken" in _text(project / "b.log")
        same_pid = _text(project / "b.pid") == b_pid and b_pid.count("\n") == 1
        pings_total = len(_pings(project))
    conn.samples = gaps
    ok = not broken and same_pid and not others and len(changes) >= len(gaps)
    conn.extra = {"survived": ok, "other_changes": others, "b_pings": pings_total}
    conn.check = lambda r, _ref: bool(r.extra["survived"])
    conn.note = (
        f"b: same pid {same_pid}, failed pings {'yes' if broken else 'none'}, {pings_total} pings;"
        f" replanned: {sorted(set(changes))} over {len(gaps)} edit(s)"
    )


async def hot_reload(bench: Bench) -> None:
    """File save → new process running for a ``run`` change; unrelated connection survives."""
    await anyio.to_thread.run_sync(_reload, bench)


# --- volumes --------------------------------------------------------------------------------


def _volumes(bench: Bench) -> None:
    size = bench.sizes.volume_bytes
    name = f"volume read {size // 1_000_000} MB"
    cp = bench.table.add(Row(name, "kubectl cp", "MB/s", higher_is_better=True))
    mount = bench.table.add(
        Row(name, "sshfs mount", "MB/s", reference="kubectl cp", higher_is_better=True)
    )
    ns = bench.ns.name
    config = _config(
        ns,
        {
            "v": {
                "new": True,
                "method": "inject-tcp",
                "run": "sh -c 'echo \"$$TELEPRESENCE_ROOT\" > root.txt; exec sleep 3600'",
            }
        },
    )
    with running_up(config) as up:
        up.wait_line(r"^v ready$", 120)
        _wait(lambda: _text(up.project / "root.txt").strip(), 60, "the process", 0.01)
        root = Path(_text(up.project / "root.txt").strip())
        if not root.is_absolute():
            root = up.project / root
        _wait(partial(_state_pod, up, "v"), 30, "the pod in .tpconf/state.json", 0.05)
        pod = _state_pod(up, "v")
        for run in range(bench.sizes.volume_runs):
            remote = f"/tmp/big-{run}"
            kubectl("-n", ns, "exec", pod, "-c", AGENT_CONTAINER, "--", "sh", "-c",
                    f"head -c {size} /dev/urandom > {remote}", timeout=120)  # fmt: skip
            order = [("cp", cp), ("mount", mount)]
            for how, row in order if run % 2 == 0 else order[::-1]:
                row.samples.append(size / 1e6 / _copy(how, up, ns, pod, root, remote, size))
    mount.note = f"{size} bytes of random data, fresh file per run, copied to a local file"


def _state_pod(up: UpProcess, name: str) -> str:
    """The deployment's pod from ``.tpconf/state.json`` ('' until it is written)."""
    try:
        deployments = up.state()["deployments"]
    except (OSError, ValueError, KeyError):
        return ""
    return next((str(d["pod"]) for d in deployments if d["name"] == name and d["pod"]), "")


def _copy(how: str, up: UpProcess, ns: str, pod: str, root: Path, remote: str, size: int) -> float:
    dest = up.project / f"copy-{how}"
    start = time.monotonic()
    if how == "cp":
        kubectl("cp", "-c", AGENT_CONTAINER, f"{ns}/{pod}:{remote}", str(dest), timeout=300)
    else:
        with open(root / remote.lstrip("/"), "rb") as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    took = time.monotonic() - start
    got = dest.stat().st_size
    dest.unlink()
    if got != size:
        raise RuntimeError(f"{how}: copied {got} bytes, expected {size}")
    return took


async def volumes(bench: Bench) -> None:
    """Reading a file through the sshfs mount vs ``kubectl cp``."""
    await anyio.to_thread.run_sync(_volumes, bench)
