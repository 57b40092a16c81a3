"""The cluster scripts' process and config helpers (tests/cluster/lib.sh), run by a real bash on
real processes in a scratch state directory: a component is alive only by its pid *and* start
time, a reused pid is never taken for it nor signalled, and config files are rewritten only when
their content changes (issue 11: "the local cluster does not heal")."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.supervisor.procs import alive
from tpconf.pids import ProcessId

pytestmark = pytest.mark.timeout(60)

LIB = Path(__file__).with_name("lib.sh")


def bash(state: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` after sourcing lib.sh with its state under ``state``."""
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; . "{LIB}"; mkdir -p "$RUN" "$LOGS"\n{script}'],
        env={**os.environ, "TPCONF_CLUSTER_STATE": str(state)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A process that is no component (it got a stopped component's pid, say)."""
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def test_start_records_pid_and_start_time_and_a_second_start_leaves_it_running(
    tmp_path: Path,
) -> None:
    first = bash(tmp_path, 'start sleep sleep 300; cat "$RUN/sleep.pid"')
    assert first.returncode == 0, first.stderr
    pid, start = (int(x) for x in first.stdout.split())
    try:
        identity = ProcessId.of(pid)
        assert identity is not None and identity.start == start
        again = bash(tmp_path, 'start sleep sleep 300; cat "$RUN/sleep.pid"; alive sleep')
        assert again.returncode == 0, again.stderr
        assert again.stdout.split() == [str(pid), str(start)]  # not started twice
        assert "starting" not in again.stderr
        stopped = bash(tmp_path, 'stop sleep; alive sleep || echo gone; ls "$RUN"')
        assert stopped.stdout.split() == ["gone"]
        assert not alive(pid)
    finally:
        if alive(pid):
            os.kill(pid, 9)


def test_a_pid_file_whose_pid_now_runs_another_process_is_not_alive_and_nothing_is_signalled(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    identity = ProcessId.of(stranger.pid)
    assert identity is not None
    (tmp_path / "run").mkdir()
    # kube-apiserver stopped; its pid now runs `stranger` (which started later).
    (tmp_path / "run" / "kube-apiserver.pid").write_text(f"{stranger.pid} {identity.start - 1}\n")
    result = bash(tmp_path, "alive kube-apiserver && echo alive || echo dead; stop kube-apiserver")
    assert result.stdout.split() == ["dead"], result.stderr
    assert stranger.poll() is None, "stop signalled a process that is not the component"
    assert not (tmp_path / "run" / "kube-apiserver.pid").exists()


def test_an_older_pid_file_counts_only_if_its_pid_runs_the_components_program(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "etcd.pid").write_text(f"{stranger.pid}\n")
    (tmp_path / "run" / "sleep.pid").write_text(f"{stranger.pid}\n")
    result = bash(
        tmp_path,
        "for c in etcd sleep; do if alive $c; then echo $c:alive; else echo $c:dead; fi; done",
    )
    assert result.stdout.split() == ["etcd:dead", "sleep:alive"], result.stderr


def test_a_stopped_component_is_started_again_and_says_so(tmp_path: Path) -> None:
    first = bash(tmp_path, 'start sleep sleep 300; cat "$RUN/sleep.pid"')
    old = new = int(first.stdout.split()[0])
    os.kill(old, 9)
    try:
        again = bash(tmp_path, 'start sleep sleep 300; cat "$RUN/sleep.pid"')
        new = int(again.stdout.split()[0])
        assert new != old and alive(new)
        assert "sleep is not running: starting it again" in again.stderr
    finally:
        for pid in (old, new):
            if alive(pid):
                os.kill(pid, 9)


def test_a_config_file_is_rewritten_only_when_its_content_changes(tmp_path: Path) -> None:
    conf = tmp_path / "kube-proxy.yaml"
    script = f'if write_if_changed "{conf}" <<< "$1"; then echo wrote; else echo same; fi'
    assert bash(tmp_path, script.replace("$1", "mode: iptables")).stdout == "wrote\n"
    before = conf.stat()
    assert bash(tmp_path, script.replace("$1", "mode: iptables")).stdout == "same\n"
    after = conf.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert bash(tmp_path, script.replace("$1", "mode: ipvs")).stdout == "wrote\n"
    assert conf.read_text() == "mode: ipvs\n"
    assert oct(conf.stat().st_mode & 0o777) == "0o644"
    assert list(tmp_path.glob("kube-proxy.yaml.*")) == []  # no temporary file left
