"""`kill -9` of `tpconf up` at ten points of start-up and shutdown, each followed by `tpconf down`
(issue 11): every swapped and intercepted Deployment is restored exactly (template, Services,
replicas), and no object, Lease, mount or child process of tpconf is left.

One `up` per point, with three deployments: a `swap` of `web`, an `intercept` of `api` (both with
2 replicas and Services), and a `new` proxy with volumes and a process.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import E2ECluster
from tests.e2e.harness import (
    TOOLS,
    Up,
    container,
    deploy,
    deployment,
    service,
    tpconf,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults, pytest.mark.timeout(600)]

APP = "import http.server as h; h.ThreadingHTTPServer(('', 8080), h.SimpleHTTPRequestHandler).serve_forever()"

#: Where to kill: (when, pattern in up's output). "start": while starting; "stop": after SIGINT.
POINTS = [
    ("start", None),  # half a second after the spawn, before any object exists
    ("start", r"recording the swap on"),
    ("start", r"creating proxy Deployment"),
    ("start", r"scaling Deployment \"web\""),
    ("start", r"adding the agent to the pods"),
    ("start", r"rollout of Deployment \"api\""),
    ("start", r"pointing Service \"api\""),
    ("start", r"^new\s+ready"),
    ("stop", r"restoring Service \"api\""),
    ("stop", r"restoring Deployment \"web\""),
]


def workloads() -> list[dict[str, object]]:
    objects: list[dict[str, object]] = []
    for name in ("web", "api"):
        main = container(
            "main",
            TOOLS,
            command=["python3", "-c", APP],
            ports=[8080],
            readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        )
        manifest = deployment(name, containers=[main], replicas=2)
        manifest["spec"]["strategy"] = {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
        objects += [manifest, service(name, [8080])]
    return objects


def snapshot(cluster: E2ECluster, namespace: str) -> dict[str, str]:
    """What must be exactly as before: templates, replicas, annotations, Service specs."""
    out = {}
    for kind in ("deployment", "service"):
        for name in ("web", "api"):
            obj = json.loads(
                cluster.kubectl("-n", namespace, "get", kind, name, "-o", "json").stdout
            )
            meta = {k: dict(obj["metadata"].get(k) or {}) for k in ("labels", "annotations")}
            # The controller counts every rollout, the one back to the original too.
            meta["annotations"].pop("deployment.kubernetes.io/revision", None)
            keep = (
                {"template": obj["spec"]["template"], "replicas": obj["spec"]["replicas"]}
                if kind == "deployment"
                else obj["spec"]
            )
            out[f"{kind}/{name}"] = json.dumps({"spec": keep, **meta}, sort_keys=True)
    return out


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of every live descendant of ``root`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
        starts[int(entry)] = fields[19]
    out: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out[child] = starts[child]
            todo.append(child)
    return out


def still_running(family: dict[int, str]) -> list[str]:
    """The command lines of those of ``family`` that still run (not a reused pid)."""
    alive = []
    for pid, start in family.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            alive.append(f"{pid}: {argv}")
    return alive


@pytest.fixture
def project(cluster: E2ECluster, namespace: str, tmp_path: Path) -> Iterator[Path]:
    deploy(cluster, namespace, *workloads())
    write_config(
        tmp_path,
        textwrap.dedent(
            f"""\
            version: 1
            namespace: {namespace}
            deployments:
              web:
                swap: web
                volumes: false
              api:
                intercept: {{deployment: api, headers: {{x-dev: me}}}}
                volumes: false
              new:
                new: true
                run: sleep 3600
            """
        ),
    )
    yield tmp_path


@pytest.mark.parametrize(("when", "pattern"), POINTS, ids=[f"{w}:{p}" for w, p in POINTS])
def test_kill_9_then_down_restores_everything_exactly(
    cluster: E2ECluster, namespace: str, project: Path, when: str, pattern: str | None
) -> None:
    before = snapshot(cluster, namespace)
    up = Up(cluster, project).start()
    assert up.process is not None
    try:
        if when == "stop":
            up.wait_for(r"^new\s+ready", timeout=300)
            up.wait_for(r"^api\s+ready", timeout=300)
            up.wait_for(r"^web\s+ready", timeout=300)
            up.process.send_signal(signal.SIGINT)
        if pattern is None:
            time.sleep(0.5)
        else:
            up.wait_for(pattern, timeout=300)
        family = descendants(up.process.pid)
    finally:
        up.kill()
    # Every child (kubectl port-forward, sshfs, the process) dies with it.
    try:
        wait_until(lambda: not still_running(family), 15, "tpconf up's children to go")
    except AssertionError:
        raise AssertionError(f"still running: {still_running(family)}") from None
    out = tpconf(cluster, project, "down", timeout=300)
    for name in ("web", "api"):
        cluster.kubectl(
            "-n", namespace, "rollout", "status", f"deployment/{name}", "--timeout=180s", timeout=200
        )  # fmt: skip
    assert snapshot(cluster, namespace) == before, out
    left = cluster.kubectl(
        "-n", namespace, "get", "deployments,services,secrets,leases",
        "-l", "app.kubernetes.io/managed-by=tpconf", "-o", "name",
    ).stdout  # fmt: skip
    assert left.strip() == "", out
    assert str(project) not in Path("/proc/self/mounts").read_text()
    # A second down finds nothing more to do.
    assert "nothing to clean up" in tpconf(cluster, project, "down", timeout=300)
