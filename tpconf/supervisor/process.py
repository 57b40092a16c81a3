"""Run one deployment's local command, supervised the way ``docker compose up`` runs a service.

The command starts in its own session, so it and everything it starts share one process group.
Its stdout and stderr reach an :class:`~tpconf.supervisor.output.OutputSink` line by line (the
unfinished last line too). When the command exits on its own, whatever it left running in its
group is stopped, and the exit is reported (to the sink, as compose's printer gets its
containers' exits) and returned. :func:`run_process` runs it once; :func:`run_restarting`
starts it again as `restart` says (compose's policies: ``no``, the default, ``on-failure``,
``always``), waiting :data:`RESTART_DELAY` seconds, doubled after each quick exit up to
:data:`RESTART_DELAY_MAX`, and from the start again once a run lasted :data:`RESTART_RESET`
seconds (Docker's rule, with its ceiling lowered for a laptop). When the task is cancelled the
stop ladder runs on the whole group, shielded: SIGTERM, ``term_grace`` seconds, SIGKILL,
``kill_grace`` seconds, each step logged. Signalling only the pid would leave a shell's
grandchildren running. If tpconf itself dies (even ``kill -9``), the kernel kills the command
(:func:`tpconf.pids.open_child`) and ``tpconf down`` stops what is left of its group.

Use it as a unit of the reconciler::

    pid = await tg.start(run_process, spec, output=sink)
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
from anyio.abc import ByteReceiveStream, Process, TaskStatus

from tpconf.errors import ProcessError
from tpconf.pids import group_members, open_child
from tpconf.supervisor.output import OutputSink, Stream

__all__ = ["ProcessExit", "ProcessSpec", "Restart", "hurry", "run_process", "run_restarting"]

log = logging.getLogger(__name__)

#: A line longer than this is passed on in pieces, so a program printing without newlines
#: cannot make tpconf buffer without bound.
MAX_LINE = 64 * 1024

#: After the group is gone, how long output still in the pipes may take to arrive. A process
#: that left the group (``setsid``) and kept the pipe open is not waited for beyond this.
DRAIN_TIMEOUT = 0.5

#: How often the group is checked for leftovers while waiting in the stop ladder.
_POLL = 0.02

#: Event loops whose stop ladders are hurried (:func:`hurry`).
_hurried: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def hurry() -> None:
    """Make the stop ladders of this event loop send SIGKILL now instead of waiting out
    ``term_grace``: ``up`` calls it on a second Ctrl-C, as compose kills on its second."""
    _hurried.add(asyncio.get_running_loop())


def _hurrying() -> bool:
    return asyncio.get_running_loop() in _hurried


#: Seconds before the first restart; doubled after each run shorter than :data:`RESTART_RESET`.
RESTART_DELAY = 0.5
#: The delay between restarts stops growing here (seconds).
RESTART_DELAY_MAX = 30.0
#: A run at least this long (seconds) counts as healthy: the next delay is the first again.
RESTART_RESET = 10.0

Restart = Literal["no", "on-failure", "always"]
"""When :func:`run_restarting` starts a command again: compose's `restart` policies."""


@dataclass(frozen=True, kw_only=True)
class ProcessSpec:
    """What to run for one deployment. Exactly one of ``argv`` and ``shell`` is set."""

    name: str
    """The deployment's name: the output prefix and the subject of every message."""

    env: Mapping[str, str] = field(hash=False)
    """The complete environment (see :func:`tpconf.supervisor.env.process_environment`)."""

    argv: tuple[str, ...] = ()
    """The command and its arguments, run without a shell. ``argv[0]`` is looked up in the
    ``PATH`` of :attr:`env`."""

    shell: str | None = None
    """A command line for ``/bin/sh -c``; pipes, ``&&`` and ``&`` work."""

    cwd: str | None = None
    """Working directory; tpconf's own when ``None``."""

    wrapper: tuple[str, ...] = ()
    """Put in front of the command, e.g. ``("/usr/bin/torsocks",)`` for inject-tcp."""

    term_grace: float = 5.0
    """Seconds between SIGTERM and SIGKILL when stopping."""

    kill_grace: float = 1.0
    """Seconds to wait for the group to disappear after SIGKILL."""

    death_signal: signal.Signals = signal.SIGKILL
    """What the kernel sends the command if tpconf dies. SIGTERM for a command that must pass
    it on before it ends (``docker run`` stops its container), else the default SIGKILL."""

    def __post_init__(self) -> None:
        if bool(self.argv) == (self.shell is not None):
            raise ValueError("ProcessSpec needs exactly one of argv and shell")
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "wrapper", tuple(self.wrapper))

    @property
    def command(self) -> tuple[str, ...]:
        """The argv actually executed: wrapper, then the command or ``/bin/sh -c``."""
        body = self.argv if self.shell is None else ("/bin/sh", "-c", self.shell)
        return self.wrapper + body

    @property
    def hint(self) -> str:
        """Where the user fixes the command."""
        return f"check `run:` in telepresence.yaml for deployment {self.name}"


@dataclass(frozen=True)
class ProcessExit:
    """How a supervised process ended."""

    name: str
    pid: int
    returncode: int | None
    """The exit code; negative for a signal (``-9`` is SIGKILL); ``None`` if the process could
    not be made to exit even by SIGKILL."""

    stopped: bool = False
    """True when tpconf stopped it (cancellation), False when it ended on its own."""

    hint: str | None = None
    """What to check, when the exit code suggests a mistake in the command."""

    @property
    def signal(self) -> signal.Signals | None:
        """The signal that killed the process, if one did."""
        if self.returncode is None or self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode)
        except ValueError:
            return None

    def describe(self) -> str:
        """``exited with code N`` or ``killed by signal SIGX``, and a hint if there is one."""
        if self.returncode is None:
            text = "did not exit after SIGKILL"
        elif self.returncode < 0:
            sig = self.signal
            text = f"killed by signal {sig.name if sig else -self.returncode}"
        else:
            text = f"exited with code {self.returncode}"
        if self.stopped:
            text = f"stopped ({text})"
        return f"{text}: {self.hint}" if self.hint else text

    def __str__(self) -> str:
        return f"{self.name} {self.describe()}"


class _LineReader:
    """Cuts a byte stream into lines for the sink. ``run`` can be resumed after cancellation."""

    def __init__(self, stream: ByteReceiveStream, emit: Callable[[str], None]) -> None:
        self._stream = stream
        self._emit = emit
        self._buffer = b""
        self.eof = anyio.Event()

    async def run(self) -> None:
        while True:
            try:
                chunk = await self._stream.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                break
            self._feed(chunk)
        self.flush()
        self.eof.set()

    def _feed(self, chunk: bytes) -> None:
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        for line in lines:
            self._line(line)
        while len(self._buffer) > MAX_LINE:
            self._line(self._buffer[:MAX_LINE])
            self._buffer = self._buffer[MAX_LINE:]

    def _line(self, raw: bytes) -> None:
        self._emit(raw.removesuffix(b"\r").decode("utf-8", errors="replace"))

    def flush(self) -> None:
        """Pass on an unfinished last line."""
        if self._buffer:
            buffer, self._buffer = self._buffer, b""
            self._line(buffer)


def _executable(program: str, *, env: Mapping[str, str], cwd: str | None) -> bool:
    if "/" in program:
        path = Path(cwd or ".", program)
        return path.is_file() and os.access(path, os.X_OK)
    return shutil.which(program, path=env.get("PATH", os.defpath)) is not None


def _preflight(spec: ProcessSpec) -> None:
    """Fail with a message naming the deployment before spawning, where that is possible."""
    if spec.cwd is not None and not Path(spec.cwd).is_dir():
        raise ProcessError(
            f"{spec.name}: working directory {spec.cwd} does not exist", hint=spec.hint
        )
    if spec.wrapper and not _executable(spec.wrapper[0], env=spec.env, cwd=spec.cwd):
        raise ProcessError(
            f"{spec.name}: {spec.wrapper[0]} (the method's wrapper) is not installed",
            hint="install the Debian/Ubuntu package that provides it, e.g. `torsocks`",
        )
    if spec.argv and not _executable(spec.argv[0], env=spec.env, cwd=spec.cwd):
        raise ProcessError(f"{spec.name}: command not found: {spec.argv[0]}", hint=spec.hint)


def _start_error(spec: ProcessSpec, exc: OSError | ValueError) -> ProcessError:
    program = spec.command[0]
    if isinstance(exc, FileNotFoundError):
        return ProcessError(f"{spec.name}: command not found: {program}", hint=spec.hint)
    if isinstance(exc, PermissionError):
        return ProcessError(f"{spec.name}: {program} is not executable", hint=spec.hint)
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return ProcessError(f"{spec.name}: cannot start {program}: {reason}", hint=spec.hint)


def _exit_hint(spec: ProcessSpec, returncode: int | None) -> str | None:
    """``sh -c`` reports a missing command as 127 and a non-executable one as 126."""
    if spec.shell is None:
        return None
    if returncode == 127:
        return f"command not found? {spec.hint}"
    if returncode == 126:
        return f"command not executable? {spec.hint}"
    return None


def _signal_group(name: str, pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to the group; False if the group is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("%s: not allowed to send %s to process group %d", name, sig.name, pgid)
        return False
    return True


def _group_alive(process: Process) -> bool:
    return process.returncode is None or bool(group_members(process.pid))


async def _wait_group(process: Process, timeout: float, *, hurried: bool = False) -> bool:
    """Wait until the leader is reaped and the group is empty; False on timeout (and, with
    ``hurried``, as soon as :func:`hurry` is called)."""
    with anyio.move_on_after(timeout):
        while process.returncode is None:
            with anyio.move_on_after(_POLL if hurried else math.inf):
                await process.wait()
            if hurried and _hurrying():
                return False
        while True:
            if not group_members(process.pid):
                return True
            if hurried and _hurrying():
                return False
            await anyio.sleep(_POLL)
    return False


async def stop_group(process: Process, *, name: str, term_grace: float, kill_grace: float) -> None:
    """The stop ladder on ``process``'s group (it must lead it): SIGTERM, wait, SIGKILL, wait.

    Does nothing if the group is already empty. Call it shielded.
    """
    pgid = process.pid
    if not _group_alive(process):
        return
    what = "process group" if process.returncode is None else "leftover processes in group"
    log.info("%s: sending SIGTERM to %s %d", name, what, pgid)
    if not _signal_group(name, pgid, signal.SIGTERM) or await _wait_group(
        process, term_grace, hurried=True
    ):
        log.info("%s: process group %d stopped", name, pgid)
        return
    if _hurrying():
        log.warning("%s: stopping by force: sending SIGKILL to process group %d", name, pgid)
    else:
        log.warning(
            "%s: process group %d still running %.1f s after SIGTERM, sending SIGKILL",
            name,
            pgid,
            term_grace,
        )
    if not _signal_group(name, pgid, signal.SIGKILL) or await _wait_group(process, kill_grace):
        log.info("%s: process group %d killed", name, pgid)
        return
    log.error("%s: process group %d still running %.1f s after SIGKILL", name, pgid, kill_grace)


async def _finish(process: Process, readers: list[_LineReader], spec: ProcessSpec) -> None:
    """Stop what is left of the group while still forwarding its output, then close."""
    async with anyio.create_task_group() as tg:
        for reader in readers:
            if not reader.eof.is_set():
                tg.start_soon(reader.run, name=f"output of {spec.name}")
        await stop_group(
            process, name=spec.name, term_grace=spec.term_grace, kill_grace=spec.kill_grace
        )
        with anyio.move_on_after(DRAIN_TIMEOUT):
            for reader in readers:
                await reader.eof.wait()
        tg.cancel_scope.cancel()
    for reader in readers:
        reader.flush()
    with anyio.move_on_after(spec.kill_grace):
        await process.aclose()


async def run_process(
    spec: ProcessSpec,
    *,
    output: OutputSink,
    on_exit: Callable[[ProcessExit], None] | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> ProcessExit:
    """Run ``spec`` until it exits (return how) or the task is cancelled (stop it, re-raise).

    ``task_status.started(pid)`` is called once the child exists. The exit is written to
    ``output`` as a notice and passed to ``on_exit`` in both cases, so the reconciler can show
    the process state even though a cancelled task returns nothing. Raises
    :class:`~tpconf.errors.ProcessError` (before ``started``) when the command cannot start.
    """
    _preflight(spec)
    try:
        process = await open_child(
            spec.command,
            death_signal=spec.death_signal,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=spec.cwd,
            env=spec.env,
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        raise _start_error(spec, exc) from exc

    log.info("%s: started pid %d: %s", spec.name, process.pid, shlex.join(spec.command))

    def emitter(stream: Stream) -> Callable[[str], None]:
        return lambda line: output.write(spec.name, line, stream=stream)

    assert process.stdout is not None
    assert process.stderr is not None
    readers = [
        _LineReader(process.stdout, emitter("stdout")),
        _LineReader(process.stderr, emitter("stderr")),
    ]
    stopped = False
    try:
        task_status.started(process.pid)
        async with anyio.create_task_group() as tg:
            for reader in readers:
                tg.start_soon(reader.run, name=f"output of {spec.name}")
            await process.wait()
            tg.cancel_scope.cancel()  # _finish resumes the readers
    except anyio.get_cancelled_exc_class():
        stopped = True
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await _finish(process, readers, spec)
            result = ProcessExit(
                spec.name,
                process.pid,
                process.returncode,
                stopped=stopped,
                hint=None if stopped else _exit_hint(spec, process.returncode),
            )
            log.info("%s", result)
            output.notice(spec.name, result.describe())
            if on_exit is not None:
                on_exit(result)
            output.exited(spec.name, result)
    return result


def should_restart(policy: Restart, result: ProcessExit) -> bool:
    """Whether ``policy`` starts the command again after ``result`` (never after a stop)."""
    if result.stopped or policy == "no":
        return False
    return policy == "always" or result.returncode != 0


async def run_restarting(
    spec: ProcessSpec,
    *,
    restart: Restart,
    output: OutputSink,
    on_start: Callable[[int], None] | None = None,
    on_exit: Callable[[ProcessExit], None] | None = None,
    on_wait: Callable[[float, int], None] | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> ProcessExit:
    """:func:`run_process`, started again after each exit as ``restart`` says; returns the exit
    that ends it. ``task_status.started(pid)`` comes with the first start, ``on_start(pid)``
    with every later one, ``on_exit`` with every exit and ``on_wait(delay, restart_number)``
    before each restart. A command that cannot be started again (removed meanwhile) raises
    :class:`~tpconf.errors.ProcessError`."""
    delay = RESTART_DELAY
    restarts = 0
    status: TaskStatus[int] = task_status
    while True:
        began = anyio.current_time()
        result = await run_process(spec, output=output, on_exit=on_exit, task_status=status)
        if not should_restart(restart, result):
            return result
        if anyio.current_time() - began >= RESTART_RESET:
            delay = RESTART_DELAY
        restarts += 1
        output.notice(spec.name, f"restarting in {delay:g}s (restart: {restart}, #{restarts})")
        if on_wait is not None:
            on_wait(delay, restarts)
        await anyio.sleep(delay)
        delay = min(delay * 2, RESTART_DELAY_MAX)
        status = _Started(on_start)


class _Started:
    """A task status for a restart: its pid goes to a callback (``tg.start`` has returned)."""

    def __init__(self, callback: Callable[[int], None] | None) -> None:
        self._callback = callback

    def started(self, value: int | None = None) -> None:
        if self._callback is not None and value is not None:
            self._callback(value)
