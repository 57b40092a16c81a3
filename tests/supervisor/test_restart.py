"""run_restarting: docker compose's restart policies on real children, the growing delay, and
the exits reported to the sink (issue 13, item 5)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from tpconf.supervisor import process
from tpconf.supervisor.output import CaptureSink
from tpconf.supervisor.process import ProcessExit, ProcessSpec, run_restarting, should_restart

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

# Appends a line to runs.txt, then exits 1 until it has run three times, then 0.
COUNTING = (
    "import pathlib, sys\n"
    "p = pathlib.Path('runs.txt')\n"
    "p.write_text(p.read_text() + 'run\\n' if p.exists() else 'run\\n')\n"
    "sys.exit(0 if p.read_text().count('run') >= 3 else 1)\n"
)


def counting(tmp_path: Path) -> ProcessSpec:
    return ProcessSpec(
        name="web",
        argv=(sys.executable, "-c", COUNTING),
        env=dict(os.environ),
        cwd=str(tmp_path),
        term_grace=0.5,
    )


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "RESTART_DELAY", 0.05)


async def test_on_failure_restarts_until_the_command_succeeds(tmp_path: Path) -> None:
    sink = CaptureSink()
    starts: list[int] = []
    waits: list[tuple[float, int]] = []
    exits: list[ProcessExit] = []
    with anyio.fail_after(20):
        result = await run_restarting(
            counting(tmp_path),
            restart="on-failure",
            output=sink,
            on_start=starts.append,
            on_exit=exits.append,
            on_wait=lambda delay, n: waits.append((delay, n)),
        )
    assert result.returncode == 0
    assert (tmp_path / "runs.txt").read_text() == "run\nrun\nrun\n"
    assert [e.returncode for e in exits] == [1, 1, 0]
    assert sink.exits == exits  # the sink hears every exit, as compose's printer does
    assert len(starts) == 2  # the first start is reported through task_status
    assert waits == [(0.05, 1), (0.1, 2)]  # the delay doubles after each quick exit
    assert sink.of("web", "notice") == [
        "exited with code 1",
        "restarting in 0.05s (restart: on-failure, #1)",
        "exited with code 1",
        "restarting in 0.1s (restart: on-failure, #2)",
        "exited with code 0",
    ]


async def test_no_leaves_a_failed_command_exited(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        result = await run_restarting(counting(tmp_path), restart="no", output=CaptureSink())
    assert result.returncode == 1
    assert (tmp_path / "runs.txt").read_text() == "run\n"


async def test_always_restarts_a_command_that_succeeded_until_it_is_stopped(
    tmp_path: Path,
) -> None:
    spec = ProcessSpec(
        name="web", shell="echo run >> runs.txt", env=dict(os.environ), cwd=str(tmp_path)
    )
    with anyio.move_on_after(1.5):
        await run_restarting(spec, restart="always", output=CaptureSink())
    assert (tmp_path / "runs.txt").read_text().count("run") >= 3


def test_a_stop_by_tpconf_is_never_restarted() -> None:
    stopped = ProcessExit("web", 1, -15, stopped=True)
    assert not should_restart("always", stopped)
    assert should_restart("on-failure", ProcessExit("web", 1, -9))  # a signal is a failure
    assert not should_restart("on-failure", ProcessExit("web", 1, 0))
