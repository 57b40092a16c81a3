"""No orphans (issue 11): `tpconf up` killed by SIGKILL takes every child with it — kubectl
port-forward, sshfs, the supervised command, and what the command started in its process group
(the janitor stops that) — on the real cluster."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import E2ECluster
from tests.e2e.harness import Up, file_text, run_tpconf, tpconf, wait_until
from tests.orphans import survivors, write_web
from tests.supervisor.procs import alive

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def children(pid: int) -> dict[int, str]:
    """The live children of ``pid`` and their command names."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found[int(entry)] = name
    return found


def test_kill_9_of_up_leaves_no_child_nor_what_the_command_started(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    # The command leaves a job in its process group; the parent-death signal reaches only the
    # command itself, so that job is what the janitor must stop.
    write_web(
        tmp_path,
        namespace,
        "new: true",
        "volumes: {root: pod-root}",
        'run: "sleep 600 & echo $! > job.pid; exec sleep 601"',
    )
    up = Up(cluster, tmp_path).start()
    assert up.process is not None
    try:
        up.wait_for(r"^web ready")
        wait_until(lambda: file_text(tmp_path / "job.pid").strip(), 60, "the command's job")
        pid = up.process.pid
        # Port-forward runs inside up (issue 15): no kubectl child for this kubeconfig.
        wanted = {"sshfs", "sleep"}
        wait_until(lambda: wanted <= set(children(pid).values()), 30, f"children {wanted}")
        kids = children(pid)
        job = int(file_text(tmp_path / "job.pid"))
        assert alive(job)
        mount = tmp_path / "pod-root"
        assert str(mount) in Path("/proc/self/mounts").read_text()
    finally:
        up.kill()  # SIGKILL: nothing of tpconf's own cleanup runs
    try:
        left = survivors(list(kids), timeout=10)
        assert left == [], ({p: kids[p] for p in left}, up.output[-3000:])
        # sshfs got SIGTERM: it unmounted before it went.
        wait_until(
            lambda: str(mount) not in Path("/proc/self/mounts").read_text(), 10, "the unmount"
        )
        assert survivors([job], timeout=10) == [], "the janitor stops the command's job"
        wait_until(
            lambda: not (tmp_path / ".tpconf" / "children.json").exists(), 10, "the record to go"
        )
        out = tpconf(cluster, tmp_path, "down", timeout=180)
        assert "process group" not in out, out  # nothing was left for down
        assert "nothing to clean up" in tpconf(cluster, tmp_path, "down")
    finally:
        for pid in [job, *kids]:  # whatever a failed check left behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_clean_stop_leaves_no_child_and_no_record(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    write_web(tmp_path, namespace, "new: true", 'run: "sleep 600 & exec sleep 601"')
    up = Up(cluster, tmp_path).start()
    assert up.process is not None
    try:
        up.wait_for(r"^web ready")
        pid = up.process.pid
        wait_until(lambda: "sleep" in children(pid).values(), 60, "the command")
        kids = children(pid)
    finally:
        assert up.stop() == 0, up.output[-3000:]  # SIGINT: tpconf stops everything itself
    assert survivors(list(kids)) == []
    assert not (tmp_path / ".tpconf" / "children.json").exists()


def test_a_second_ctrl_c_forces_the_stop_and_down_finishes_it(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    # Pressed again because the stop waits for a command that ignores SIGTERM (the stop ladder
    # gives it term_grace seconds): the second Ctrl-C lands while the first stop runs.
    write_web(tmp_path, namespace, "new: true", "run: \"trap '' TERM; sleep 600\"")
    up = Up(cluster, tmp_path).start()
    assert up.process is not None
    try:
        up.wait_for(r"^web ready")
        kids = children(up.process.pid)
        up.process.send_signal(signal.SIGINT)
        up.wait_for(r"^stopping", timeout=10)
        time.sleep(0.5)  # the ladder is now waiting for the command to go
        up.process.send_signal(signal.SIGINT)
        code = up.process.wait(60)
    finally:
        up.kill()
    out = up.output
    assert code == 130, out[-3000:]
    assert "forced to stop; run `tpconf down` to finish cleaning up" in out, out[-3000:]
    assert "bug in tpconf" not in out, out[-3000:]
    # Forced: the command got SIGKILL at once, not after the rest of its SIGTERM grace.
    assert "web: stopping by force: sending SIGKILL" in out, out[-3000:]
    assert "after SIGTERM" not in out, out[-3000:]
    assert survivors(list(kids)) == []
    tpconf(cluster, tmp_path, "down", timeout=180)
    left = cluster.kubectl("get", "deployments,secrets", "-n", namespace, "-o", "name").stdout
    assert "web" not in left, left
    status = run_tpconf(cluster, tmp_path, "status")
    assert "tpconf up is not running here" in status.stdout + status.stderr
