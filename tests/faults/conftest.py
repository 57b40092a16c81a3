"""The scene of the fault tests: a `tpconf up` in a laptop network namespace, running one
inject-tcp deployment (with volumes, its process a prober) and one vpn-tcp deployment (probed by
a process of the laptop that tpconf did not start), against an echo server in the cluster.

The faults restart the cluster's own components: these tests disturb anything else that uses the
cluster at the same time (CI runs tests one after the other).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import E2ECluster
from tests.e2e.harness import (
    TOOLS,
    container,
    deploy,
    deployment,
    run_tpconf,
    service,
    write_config,
)
from tests.e2e.laptop import Laptop, NetnsUp, make_laptop

HERE = Path(__file__).parent
REPO = HERE.parent.parent
ECHO_PORT = 7777
#: A recovery counts once probes have succeeded, and none failed, for this long (a fault's
#: effect can show a few seconds late: a pod's grace period, a keepalive).
STABLE = 8.0
ECHO = """
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("", 7777), H).serve_forever()
"""


@dataclass
class Probe:
    """A prober's log (tests/faults/prober.py)."""

    path: Path

    def entries(self, since: float = 0.0) -> list[dict[str, object]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line being written
            if float(entry["t"]) >= since:
                out.append(entry)
        return out

    def works_since(self, since: float, kind: str = "new") -> float | None:
        """When ``kind`` probes started to succeed for good after ``since``: the first success
        after the last failure (or after ``since`` if none failed); ``None`` if they still fail."""
        entries = [e for e in self.entries(since) if e["kind"] == kind]
        failures = [float(e["t"]) for e in entries if not e["ok"]]  # type: ignore[arg-type]
        after = max(failures, default=since)
        oks = [float(e["t"]) for e in entries if e["ok"] and float(e["t"]) > after]  # type: ignore[arg-type]
        return min(oks) if oks else None

    def broken_between(self, start: float, end: float) -> list[dict[str, object]]:
        """The kept connection's failures in [start, end]."""
        return [
            e
            for e in self.entries(start)
            if e["kind"] == "live" and not e["ok"] and float(e["t"]) <= end  # type: ignore[arg-type]
        ]


@dataclass
class Scene:
    cluster: E2ECluster
    namespace: str
    laptop: Laptop
    project: Path
    up: NetnsUp
    inj: Probe
    vpn: Probe
    vpn_prober: subprocess.Popen[bytes]

    def status(self) -> str:
        return run_tpconf(self.cluster, self.project, "status").stdout

    def wait_recovered(self, since: float, bound: float, what: str) -> float:
        """Seconds from ``since`` until both deployments make new connections again and keep
        doing so for :data:`STABLE` seconds; fails after ``bound``."""
        deadline = time.time() + bound
        while time.time() < deadline:
            a, b = self.inj.works_since(since), self.vpn.works_since(since)
            if a is not None and b is not None and time.time() - max(a, b) > STABLE:
                return max(0.0, max(a, b) - since)
            time.sleep(0.5)
        raise AssertionError(
            f"{what}: no recovery within {bound:g} s (inject-tcp: "
            f"{self.inj.works_since(since)}, vpn-tcp: {self.vpn.works_since(since)})\n"
            + self.up.output[-3000:]
        )


def component(*script: str) -> None:
    """Run lib.sh functions of the cluster scripts (stop a component)."""
    lib = REPO / "tests" / "cluster" / "lib.sh"
    subprocess.run(
        ["bash", "-c", f'set -euo pipefail; . "{lib}"; ' + "; ".join(script)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip


def heal() -> float:
    """`tests/cluster/up.sh`: starts what was stopped; when it was done."""
    subprocess.run(
        [str(REPO / "tests" / "cluster" / "up.sh")], check=True, timeout=600, capture_output=True
    )
    return time.time()


@pytest.fixture(scope="module")
def scene(cluster: E2ECluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    namespace = f"tpconf-faults-{uuid.uuid4().hex[:6]}"
    # `up` as users run it: the port-forward in its own process (a killed `kubectl port-forward`
    # child, the fallback, is tests/e2e/test_tunnel.py's).
    cluster.kubectl("create", "namespace", namespace)
    project = tmp_path_factory.mktemp("faults")
    try:
        echo = deployment(
            "echo",
            containers=[
                container("main", TOOLS, command=["python3", "-c", ECHO], ports=[ECHO_PORT])
            ],
        )
        deploy(cluster, namespace, echo, service("echo", [ECHO_PORT]))
        (project / "prober.py").write_text((HERE / "prober.py").read_text())
        write_config(
            project,
            f"""version: 1
namespace: {namespace}
deployments:
  inj:
    new: true
    method: inject-tcp
    run: [python3, prober.py, echo, "{ECHO_PORT}", inj.log]
  vpn:
    new: true
    method: vpn-tcp
    volumes: false
""",
        )
        with make_laptop(cluster, tmp_path_factory.mktemp("laptop")) as laptop:
            up = NetnsUp(cluster, project, laptop).start()
            prober = None
            try:
                up.wait_for(r"^inj\s+ready", timeout=300)
                up.wait_for(r"^vpn\s+ready", timeout=300)
                prober = subprocess.Popen(
                    ["ip", "netns", "exec", laptop.netns, sys.executable, str(HERE / "prober.py"),
                     f"echo.{namespace}.svc.cluster.local", str(ECHO_PORT), str(project / "vpn.log")],
                    start_new_session=True,
                )  # fmt: skip
                scene = Scene(
                    cluster, namespace, laptop, project, up,
                    Probe(project / "inj.log"), Probe(project / "vpn.log"), prober,
                )  # fmt: skip
                scene.wait_recovered(0.0, 60, "the first probes")
                yield scene
            finally:
                if prober is not None:
                    prober.kill()
                    prober.wait()
                if up.process is not None and up.process.poll() is None:
                    up.kill()
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
