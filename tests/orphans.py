"""Helpers for the "no orphans" tests: a parent that starts children through tpconf, then dies
by SIGKILL, and a check that its children went with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tests.supervisor.procs import alive

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def killed_parent(
    code: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    before_kill: Callable[[], None] = lambda: None,
) -> Iterator[list[int]]:
    """Run ``python -c code ARGS...``, which prints a JSON list of pids on one line once its
    children run; SIGKILL it (after ``before_kill``) and yield those pids. Whatever of them
    survives is killed after."""
    parent = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        pass_fds=pass_fds,
        cwd=REPO,
        env={**(env if env is not None else os.environ), "PYTHONPATH": str(REPO)},
    )
    assert parent.stdout is not None
    pids: list[int] = []
    try:
        line = parent.stdout.readline()  # the test's timeout bounds this
        assert line, f"the parent exited ({parent.wait()}) before starting its children"
        pids = json.loads(line)
        before_kill()
        parent.kill()
        parent.wait()
        yield pids
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def survivors(pids: list[int], timeout: float = 5.0) -> list[int]:
    """The pids still alive after waiting up to ``timeout`` seconds for them to go."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.02)
    return [p for p in pids if alive(p)]


def write_web(project: Path, namespace: str, *fields: str) -> None:
    """A telepresence.yaml of one deployment ``web`` in ``namespace``, with ``fields`` (YAML
    lines of the deployment, e.g. ``"new: true"``)."""
    body = "".join(f"    {line}\n" for line in fields)
    text = f"version: 1\nnamespace: {namespace}\ndeployments:\n  web:\n{body}"
    tmp = project / ".telepresence.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(project / "telepresence.yaml")
