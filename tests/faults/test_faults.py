"""Faults while `tpconf up` runs (issue 11): each is injected into the running scene
(tests/faults/conftest.py), and `up` must recover by itself within a stated bound, with
the tunnel shown as connected in `tpconf status` again; a fault that touches one deployment must
not break the other's kept connection. Last, Ctrl-C leaves nothing behind.

The bounds are generous on purpose (2 shared cores, other tests' load): they say "by itself,
without a restart", not how fast. The measured times are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.harness import wait_until
from tests.faults.conftest import Scene, component, heal

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.faults, pytest.mark.timeout(900)]


def report(what: str, seconds: float) -> None:
    print(f"\nfault {what}: recovered in {seconds:.1f} s")


def connected(scene: Scene) -> bool:
    state = json.loads((scene.project / ".tpconf" / "state.json").read_text())
    return all(row["tunnel"] == "connected" for row in state["deployments"])


def test_reset_connections_to_the_api_server_are_reopened(scene: Scene) -> None:
    """Every TCP connection of the laptop to the API server reset at once (as a load balancer's
    idle timeout or an API server failover does): both port-forwards and the watches."""
    laptop = scene.laptop
    start = time.time()
    reset = laptop.run("ss", "-K", "-t", "dst", laptop.api_server, "dport", "=", "6443")
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout.count("ESTAB") >= 2, reset.stdout  # at least both port-forwards
    report("API connections reset", scene.wait_recovered(start, 60, "API connections reset"))
    wait_until(lambda: connected(scene), 30, "status to show both tunnels connected")


def test_a_deleted_proxy_pod_is_replaced_and_the_other_deployment_is_untouched(
    scene: Scene,
) -> None:
    pod = scene.cluster.kubectl(
        "-n", scene.namespace, "get", "pods", "-l", "tpconf.io/proxy=inj",
        "-o", "jsonpath={.items[0].metadata.name}",
    ).stdout  # fmt: skip
    start = time.time()
    scene.cluster.kubectl("-n", scene.namespace, "delete", "pod", pod, "--wait=false")
    report("proxy pod deleted", scene.wait_recovered(start, 180, "proxy pod deleted"))
    assert scene.vpn.broken_between(start, time.time()) == []
    wait_until(lambda: connected(scene), 60, "status to show both tunnels connected")


def test_the_route_to_the_api_server_cut_for_20_seconds(scene: Scene) -> None:
    rule = ["INPUT", "-i", scene.laptop.host_if, "-d", scene.laptop.api_server, "-p", "tcp",
            "--dport", "6443", "-j", "DROP"]  # fmt: skip
    subprocess.run(["iptables", "-I", *rule], check=True)
    try:
        time.sleep(20)
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True)
    back = time.time()
    report("API route cut 20 s", scene.wait_recovered(back, 120, "API route cut"))
    wait_until(lambda: connected(scene), 60, "status to show both tunnels connected")


@pytest.mark.parametrize("name", ["kube-apiserver", "kubelet", "containerd"])
def test_a_restarted_cluster_component(scene: Scene, name: str) -> None:
    component(f"stop {name}")
    time.sleep(3)
    back = heal()
    report(f"{name} restart", scene.wait_recovered(back, 180, f"{name} restart"))
    wait_until(lambda: connected(scene), 120, "status to show both tunnels connected")


def test_ctrl_c_leaves_nothing_behind(scene: Scene) -> None:
    assert scene.up.stop(timeout=180) == 0
    laptop = scene.laptop
    assert "TPCONF" not in laptop.run("iptables-save", "-t", "nat").stdout
    assert str(scene.project) not in Path("/proc/self/mounts").read_text()
    left = scene.cluster.kubectl(
        "-n", scene.namespace, "get", "deployments,services,secrets,leases",
        "-l", "app.kubernetes.io/managed-by=tpconf", "-o", "name",
    ).stdout  # fmt: skip
    assert left.strip() == ""
    assert not (scene.project / ".tpconf" / "state.json").exists()
