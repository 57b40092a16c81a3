"""`tpconf down` cleans this machine first, whatever happens with the cluster (issue 11).

What a crashed vpn-tcp `up` leaves is staged for real in a network namespace each test makes:
its nat chains and DNS redirect (made by a process that is gone), a process group its command
left, its state file. `tpconf down` then runs in that namespace with a kubeconfig that is
missing (as under `sudo` without `-E`) or names an API server that cannot be reached: the
machine is cleaned all the same, and the cluster part is reported with how to finish. The last
test does the same after a real `up` was killed, then finishes against the real cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import anyio
import pytest
import yaml

from tests.conftest import E2ECluster
from tests.e2e.harness import (
    TPCONF,
    Up,
    deploy,
    deployment,
    tpconf,
    tpconf_env,
    wait_until,
)
from tests.orphans import survivors, write_web
from tests.supervisor.procs import alive
from tpconf.pids import ProcessId
from tpconf.reconcile.state import CHILDREN_FILE, DeploymentRow, Snapshot, write
from tpconf.redirect.routing import DnsRedirect, Routing, RuleSet

REPO = Path(__file__).resolve().parents[2]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")


def gone_process() -> ProcessId:
    """The identity of a process that ran and is gone (a crashed `tpconf up`)."""
    process = subprocess.Popen(["sleep", "30"])
    found = ProcessId.of(process.pid)
    process.kill()
    process.wait()
    assert found is not None
    return found


@dataclass
class Crash:
    """What a crashed vpn-tcp `up` left, staged in a network namespace."""

    netns: str
    project: Path
    job: subprocess.Popen[bytes]
    """A process its command left in its process group."""

    def nat(self) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, "iptables-save", "-t", "nat"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip

    def down(self, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "NO_COLOR": "1"}
        env["PYTHONPATH"] = str(REPO)
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *TPCONF, "down"],
            cwd=self.project, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip


@pytest.fixture
def crash(tmp_path: Path) -> Iterator[Crash]:
    netns = f"tpconf-down-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=10)
    job = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        project = tmp_path / "project"
        project.mkdir()
        (project / "telepresence.yaml").write_text(
            "version: 1\nnamespace: dev\ndeployments:\n  web:\n    new: true\n    method: vpn-tcp\n"
        )
        crashed = gone_process()
        state_dir = project / ".tpconf"
        row = DeploymentRow(name="web", namespace="dev", method="vpn-tcp", operation="new")
        snapshot = Snapshot(pid=crashed.pid, session="s", config="c", started=0, deployments=(row,))
        write(state_dir, snapshot)
        job_id = ProcessId.of(job.pid)
        assert job_id is not None
        record = {"owner": crashed.to_dict(), "children": [{**job_id.to_dict(), "what": "sh"}]}
        (state_dir / CHILDREN_FILE).write_text(json.dumps(record))
        rules = RuleSet(
            proxy_port=4000,
            networks=frozenset({IPv4Network("10.96.0.0/12")}),
            dns=DnsRedirect((IPv4Address("10.0.0.53"),), 4053),
        )
        prefix = ["ip", "netns", "exec", netns]
        routing = Routing(command_prefix=prefix, project=str(project), owner=crashed)
        anyio.run(routing.apply, rules)
        yield Crash(netns, project, job)
    finally:
        if job.poll() is None:
            job.kill()
        job.wait()
        subprocess.run(["ip", "netns", "del", netns], check=False, timeout=10)


def assert_machine_cleaned(crash: Crash, result: subprocess.CompletedProcess[str]) -> None:
    assert f"stopped process group {crash.job.pid} (sh) left by tpconf up" in result.stdout
    assert "removed iptables chain TPCONF-OUTPUT" in result.stdout
    assert "removed iptables chain TPCONF-ROUTES" in result.stdout
    assert "TPCONF" not in crash.nat()  # the DNS redirect is gone: the machine has DNS again
    assert survivors([crash.job.pid]) == []
    # The cluster part failed: said, with how to finish, and the state kept for the next run.
    assert result.returncode == 1
    assert "could not clean up namespace dev in the cluster: " in result.stderr
    assert "run `tpconf down` again to finish (this machine is cleaned up already)" in (
        result.stderr
    )
    assert (crash.project / ".tpconf" / "state.json").exists()


@pytest.mark.root
@needs_root
@pytest.mark.timeout(120)
def test_down_without_a_kubeconfig_cleans_the_machine_and_says_how_to_finish(
    crash: Crash, tmp_path: Path
) -> None:
    assert "TPCONF-OUTPUT" in crash.nat() and alive(crash.job.pid)
    result = crash.down(tmp_path / "no-such-kubeconfig")
    assert_machine_cleaned(crash, result)
    assert "no-such-kubeconfig" in result.stderr  # which kubeconfig was missing


@pytest.mark.root
@needs_root
@pytest.mark.timeout(120)
def test_down_with_a_malformed_state_file_says_so_and_cleans_up_all_the_same(
    crash: Crash, tmp_path: Path
) -> None:
    state = crash.project / ".tpconf" / "state.json"
    state.write_text('{"pid": -1}')
    result = crash.down(tmp_path / "no-such-kubeconfig")
    assert f"{state} is not a state file of tpconf: `session` is missing (ignored)" in (
        result.stderr
    )
    assert "bug" not in result.stderr
    assert f"stopped process group {crash.job.pid} (sh) left by tpconf up" in result.stdout
    assert "TPCONF" not in crash.nat()
    # The file names the namespace even without the state: the cluster part is still tried.
    assert "could not clean up namespace dev in the cluster: " in result.stderr


@pytest.mark.root
@needs_root
@pytest.mark.timeout(120)
def test_down_with_an_unreachable_api_server_cleans_the_machine_and_says_how_to_finish(
    crash: Crash, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://10.99.99.99:6443"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    # The server's address is routed, and every packet to it dropped: connecting times out,
    # the slowest way an API server can be unreachable.
    inside = ["ip", "netns", "exec", crash.netns]
    for command in (
        ["ip", "link", "add", "tpbh0", "type", "veth", "peer", "name", "tpbh1"],
        ["ip", "addr", "add", "10.99.99.1/24", "dev", "tpbh0"],
        ["ip", "link", "set", "tpbh0", "up"],
        ["ip", "link", "set", "tpbh1", "up"],
        ["iptables", "-A", "OUTPUT", "-d", "10.99.99.99", "-j", "DROP"],
    ):
        subprocess.run([*inside, *command], check=True, timeout=10)
    started = time.monotonic()
    result = crash.down(kubeconfig)
    elapsed = time.monotonic() - started
    assert_machine_cleaned(crash, result)
    assert elapsed < 60, f"down took {elapsed:.0f} s with the API server unreachable"
    print(f"tpconf down with the API server unreachable: {elapsed:.1f} s")


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_after_kill_9_down_without_a_kubeconfig_then_with_it_restores_everything(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    deploy(cluster, namespace, deployment("web", replicas=2))
    write_web(tmp_path, namespace, "swap: true", 'run: "sleep 600 & exec sleep 601"')
    up = Up(cluster, tmp_path).start()
    try:
        up.wait_for(r"^web ready")
        job = wait_until(_job, 30, "the job's two processes")
        assert isinstance(job, list)
    finally:
        up.kill()
    assert replicas_of(cluster, namespace, "web") == "0"
    env = tpconf_env(cluster)
    env["KUBECONFIG"] = str(tmp_path / "missing")
    first = subprocess.run(
        [*TPCONF, "down"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert first.returncode == 1, first.stdout + first.stderr
    # The job is gone: up's janitor stops it, or down does when it outlived the janitor.
    assert survivors(job) == []
    assert "run `tpconf down` again to finish" in first.stderr
    assert replicas_of(cluster, namespace, "web") == "0"  # the cluster part is still to do
    out = tpconf(cluster, tmp_path, "down")
    assert "restored" in out, out
    assert replicas_of(cluster, namespace, "web") == "2"
    assert not (tmp_path / ".tpconf" / "state.json").exists()


def _job() -> list[int] | None:
    """The processes of `sleep 600 & exec sleep 601`, once both run."""
    found = subprocess.run(
        ["pgrep", "-f", "^sleep 60[01]$"], capture_output=True, text=True, check=False
    ).stdout.split()
    return [int(pid) for pid in found] if len(found) == 2 else None


def replicas_of(cluster: E2ECluster, namespace: str, name: str) -> str:
    return cluster.kubectl(
        "-n", namespace, "get", "deployment", name, "-o", "jsonpath={.spec.replicas}"
    ).stdout  # fmt: skip
