"""Running `tpconf up` as a real child process against the real cluster, and watching it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import LOCAL_STATE, E2ECluster

TPCONF = [sys.executable, "-m", "tpconf"]


def tpconf_env(cluster: E2ECluster) -> dict[str, str]:
    env = dict(os.environ)
    env["KUBECONFIG"] = cluster.kubeconfig
    env["TPCONF_KUBECTL"] = cluster.kubectl_path
    env["NO_COLOR"] = "1"
    env["PATH"] = f"{LOCAL_STATE / 'bin'}:{env.get('PATH', '')}"
    return env


def wait_until(check: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


class Up:
    """One `tpconf up` in ``project``; its output goes to ``project/up.log``."""

    def __init__(self, cluster: E2ECluster, project: Path) -> None:
        self.cluster = cluster
        self.project = project
        self.log_path = project / "up.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> Up:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*TPCONF, "up", *args],
            cwd=self.project,
            env=tpconf_env(self.cluster),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120, *, after: int = 0) -> re.Match[str]:
        """Wait for ``pattern`` (a regex) in the output past offset ``after``."""

        def find() -> re.Match[str] | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"tpconf up exited ({self.process.returncode}) before {pattern!r}:\n"
                    + self.output[-3000:]
                )
            return re.compile(pattern, re.MULTILINE).search(self.output, after)

        try:
            match = wait_until(find, timeout, repr(pattern))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- up.log ---\n{self.output[-3000:]}") from None
        assert isinstance(match, re.Match)
        return match

    def stop(self, timeout: float = 120) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("tpconf up did not stop within the timeout") from None
        return self.process.returncode

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


def run_tpconf(
    cluster: E2ECluster, project: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run one tpconf command in ``project``, whatever its exit code."""
    return subprocess.run(
        [*TPCONF, *args],
        cwd=project,
        env=tpconf_env(cluster),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def tpconf(cluster: E2ECluster, project: Path, *args: str, timeout: float = 120) -> str:
    """Run one tpconf command in ``project``; return its stdout (fails on a non-zero exit)."""
    proc = run_tpconf(cluster, project, *args, timeout=timeout)
    assert proc.returncode == 0, f"tpconf {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def write_config(project: Path, text: str) -> None:
    """Save telepresence.yaml the way editors do: a temp file renamed over the original."""
    tmp = project / ".telepresence.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(project / "telepresence.yaml")
