"""run_process with real children: exit codes, signals, output lines, the stop ladder on the group."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import anyio
import pytest

from tests.orphans import killed_parent, survivors
from tests.supervisor.procs import alive
from tpconf.errors import ProcessError
from tpconf.supervisor import process as process_module
from tpconf.supervisor.output import CaptureSink
from tpconf.supervisor.process import MAX_LINE, ProcessExit, ProcessSpec, hurry, run_process

pytestmark = pytest.mark.anyio


def py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def spec(
    *,
    name: str = "web",
    argv: tuple[str, ...] = (),
    shell: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    wrapper: tuple[str, ...] = (),
) -> ProcessSpec:
    return ProcessSpec(
        name=name,
        argv=argv,
        shell=shell,
        env=dict(os.environ) if env is None else env,
        cwd=cwd,
        wrapper=wrapper,
        term_grace=0.5,
        kill_grace=2.0,
    )


async def wait_for_line(sink: CaptureSink, name: str, text: str) -> None:
    with anyio.fail_after(15):
        while True:
            if text in sink.of(name):
                return
            await anyio.sleep(0.01)


async def run(s: ProcessSpec, sink: CaptureSink | None = None) -> ProcessExit:
    with anyio.fail_after(15):
        return await run_process(s, output=sink or CaptureSink())


async def test_exit_code_is_returned_reported_and_passed_to_on_exit() -> None:
    sink = CaptureSink()
    seen: list[ProcessExit] = []
    with anyio.fail_after(15):
        result = await run_process(
            spec(argv=py("raise SystemExit(3)")), output=sink, on_exit=seen.append
        )
    assert result.returncode == 3
    assert not result.stopped
    assert str(result) == "web exited with code 3"
    assert sink.of("web", "notice") == ["exited with code 3"]
    assert seen == [result]


async def test_a_signal_death_is_reported_by_signal_name() -> None:
    result = await run(spec(argv=py("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")))
    assert result.returncode == -15
    assert result.describe() == "killed by signal SIGTERM"


async def test_started_reports_the_pid_of_the_child() -> None:
    results: list[ProcessExit] = []
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(15):
            pid = await tg.start(
                lambda task_status: run_process(
                    spec(argv=py("pass")),
                    output=CaptureSink(),
                    on_exit=results.append,
                    task_status=task_status,
                )
            )
    assert results[0].pid == pid


async def test_stdout_and_stderr_arrive_as_lines_including_an_unfinished_last_line() -> None:
    sink = CaptureSink()
    code = (
        "import sys\n"
        "sys.stdout.write('one\\r\\ntwo\\n'); sys.stdout.flush()\n"
        "sys.stderr.write('oops\\n'); sys.stderr.flush()\n"
        "sys.stdout.write('no newline é')"
    )
    await run(spec(argv=py(code)), sink)
    assert sink.of("web", "stdout") == ["one", "two", "no newline é"]
    assert sink.of("web", "stderr") == ["oops"]


async def test_a_line_longer_than_the_limit_arrives_in_pieces() -> None:
    sink = CaptureSink()
    await run(spec(argv=py(f"print('x' * {2 * MAX_LINE + 10}, end='')")), sink)
    assert [len(line) for line in sink.of("web", "stdout")] == [MAX_LINE, MAX_LINE, 10]


async def test_two_processes_interleave_without_mixing_lines() -> None:
    sink = CaptureSink()
    code = "import time\nfor i in range(40):\n    print('{}-%d' % i, flush=True)\n    time.sleep(0.001)"
    async with anyio.create_task_group() as tg:
        for name in ("api", "web"):
            tg.start_soon(run, spec(name=name, argv=py(code.format(name))), sink)
    for name in ("api", "web"):
        assert sink.of(name, "stdout") == [f"{name}-{i}" for i in range(40)]
    assert {c.name for c in sink.lines} == {"api", "web"}


async def test_the_environment_is_exactly_the_given_mapping() -> None:
    sink = CaptureSink()
    env = {"PATH": os.environ["PATH"], "ONLY": "this"}
    await run(
        spec(argv=py("import os; print(os.environ['ONLY'], 'HOME' in os.environ)"), env=env), sink
    )
    assert sink.of("web", "stdout") == ["this False"]


async def test_the_wrapper_runs_in_front_of_the_command(tmp_path: Path) -> None:
    sink = CaptureSink()
    s = spec(shell="echo $WRAPPED; pwd", wrapper=("env", "WRAPPED=yes"), cwd=str(tmp_path))
    assert s.command == ("env", "WRAPPED=yes", "/bin/sh", "-c", "echo $WRAPPED; pwd")
    await run(s, sink)
    assert sink.of("web", "stdout") == ["yes", str(tmp_path)]


async def test_a_missing_command_fails_to_start_with_a_hint_naming_the_deployment() -> None:
    with pytest.raises(ProcessError) as info:
        await run(spec(argv=("tpconf-no-such-command", "--flag")))
    assert info.value.message == "web: command not found: tpconf-no-such-command"
    assert info.value.hint == "check `run:` in telepresence.yaml for deployment web"


async def test_a_missing_command_fails_tg_start() -> None:
    with pytest.RaisesGroup(ProcessError):
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(15):
                await tg.start(
                    lambda task_status: run_process(
                        spec(argv=("./not-here",)), output=CaptureSink(), task_status=task_status
                    )
                )


async def test_a_missing_working_directory_fails_to_start(tmp_path: Path) -> None:
    with pytest.raises(ProcessError, match="working directory .* does not exist"):
        await run(spec(argv=py("pass"), cwd=str(tmp_path / "gone")))


async def test_a_missing_command_in_a_shell_line_exits_127_with_a_hint() -> None:
    sink = CaptureSink()
    result = await run(spec(shell="tpconf-no-such-command"), sink)
    assert result.returncode == 127
    assert result.hint == "command not found? check `run:` in telepresence.yaml for deployment web"
    assert sink.of("web", "notice") == [f"exited with code 127: {result.hint}"]
    assert any("tpconf-no-such-command" in line for line in sink.of("web", "stderr"))


async def test_cancellation_stops_gracefully_and_keeps_the_shutdown_output() -> None:
    sink = CaptureSink()
    seen: list[ProcessExit] = []
    code = (
        "import signal, sys, time\n"
        "def bye(*_):\n    print('bye', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\ntime.sleep(30)"
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_process(spec(argv=py(code)), output=sink, on_exit=seen.append))
        await wait_for_line(sink, "web", "ready")
        tg.cancel_scope.cancel()
    assert sink.of("web", "stdout") == ["ready", "bye"]
    assert seen[0].stopped
    assert seen[0].returncode == 0
    assert sink.of("web", "notice") == ["stopped (exited with code 0)"]


async def test_a_child_ignoring_sigterm_is_killed_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tpconf.supervisor")
    sink = CaptureSink()
    seen: list[ProcessExit] = []
    code = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\ntime.sleep(30)"
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_process(spec(argv=py(code)), output=sink, on_exit=seen.append))
        await wait_for_line(sink, "web", "ready")
        started = time.monotonic()
        tg.cancel_scope.cancel()
    assert time.monotonic() - started >= 0.5
    assert seen[0].returncode == -9
    assert seen[0].describe() == "stopped (killed by signal SIGKILL)"
    assert not alive(seen[0].pid)
    pgid = seen[0].pid
    assert [r.getMessage() for r in caplog.records][-4:] == [
        f"web: sending SIGTERM to process group {pgid}",
        f"web: process group {pgid} still running 0.5 s after SIGTERM, sending SIGKILL",
        f"web: process group {pgid} killed",
        "web stopped (killed by signal SIGKILL)",
    ]


async def test_hurry_cuts_the_sigterm_grace_short_for_a_process_that_ignores_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A second Ctrl-C of `up` calls hurry(): the ladder sends SIGKILL at once instead of
    # waiting out term_grace (60 s here: the test would time out waiting for it).
    caplog.set_level(logging.INFO, logger="tpconf.supervisor")
    sink = CaptureSink()
    seen: list[ProcessExit] = []
    code = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\ntime.sleep(120)"
    )
    patient = ProcessSpec(**{**spec(argv=py(code)).__dict__, "term_grace": 60.0})
    stopping = anyio.CancelScope()

    async def supervised() -> None:
        with stopping:
            await run_process(patient, output=sink, on_exit=seen.append)

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(supervised)
                await wait_for_line(sink, "web", "ready")
                stopping.cancel()
                await anyio.sleep(0.5)
                assert not seen  # the ladder sent SIGTERM and waits out the grace
                hurry()
    finally:
        # up's loop ends after a hurry; a test's may run other tests (anyio's runner).
        process_module._hurried.discard(asyncio.get_running_loop())
    pgid = seen[0].pid
    assert seen[0].describe() == "stopped (killed by signal SIGKILL)"
    assert not alive(pgid)
    assert f"web: stopping by force: sending SIGKILL to process group {pgid}" in [
        r.getMessage() for r in caplog.records
    ]


async def test_stopping_a_shell_leaves_no_grandchild_behind() -> None:
    sink = CaptureSink()
    stubborn = py(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"
    )
    line = f"sleep 30 & echo $!; {' '.join(stubborn[:2])} '{stubborn[2]}' & echo $!; wait"
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_process(spec(shell=line), output=sink))
        with anyio.fail_after(15):
            while True:
                if len(sink.of("web", "stdout")) == 2:
                    break
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    pids = [int(pid) for pid in sink.of("web", "stdout")]
    assert len(pids) == 2
    assert not any(alive(pid) for pid in pids)


async def test_a_command_that_exits_takes_its_leftover_background_processes_with_it() -> None:
    """The shell exits at once; the sleep it started keeps the output pipe open."""
    sink = CaptureSink()
    with anyio.fail_after(10):
        result = await run(spec(shell="sleep 30 & echo $!"), sink)
    assert result.returncode == 0
    assert not result.stopped
    (pid,) = (int(line) for line in sink.of("web", "stdout"))
    assert not alive(pid)


def test_a_spec_needs_exactly_one_of_argv_and_shell() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ProcessSpec(name="web", env={})
    with pytest.raises(ValueError, match="exactly one"):
        ProcessSpec(name="web", env={}, argv=("true",), shell="true")


# Runs `sleep 300` supervised, prints its pid, then waits to be killed.
SUPERVISING_PARENT = """
import anyio, json, os
from tpconf.supervisor import process as process_module
from tpconf.supervisor.output import CaptureSink
from tpconf.supervisor.process import ProcessSpec, run_process

async def main():
    spec = ProcessSpec(name="web", argv=("sleep", "300"), env=dict(os.environ))
    async with anyio.create_task_group() as tg:
        pid = await tg.start(lambda task_status: run_process(
            spec, output=CaptureSink(), task_status=task_status))
        print(json.dumps([pid]), flush=True)

anyio.run(main)
"""


@pytest.mark.timeout(30)
def test_the_command_dies_with_tpconf_even_on_sigkill() -> None:
    with killed_parent(SUPERVISING_PARENT) as pids:
        assert survivors(pids) == [], "the supervised command outlived tpconf"
