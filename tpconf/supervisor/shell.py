"""``shell: true``: an interactive shell on the terminal, in one deployment's environment.

The shell is the user's own ``$SHELL`` (tpconf's environment, never the pod's; then
``/bin/bash``, then ``/bin/sh``), attached to tpconf's own stdin, stdout and stderr. It is *not*
put in a new session: an interactive shell with job control moves itself into its own process
group and takes the terminal's foreground, so Ctrl-C and Ctrl-Z reach the shell and its jobs,
not tpconf. When it ends, tpconf takes the foreground back if the shell did not give it back
(it was killed).

The prompt names the deployment:

- **bash** runs with ``--rcfile`` pointing at a small generated file that sources
  ``/etc/bash.bashrc`` and ``~/.bashrc`` (so aliases and completion stay), then puts
  ``[tpconf:NAME]`` in front of the prompt they set (``[tpconf:NAME] \\w$`` without one).
  Chosen over ``--norc`` (Telepresence 1's choice) because a shell without the user's setup
  is a shell people leave; the cost is that a ``~/.bashrc`` may change a variable of the
  deployment's environment (usually ``PATH``, by prepending).
- **zsh** gets ``PS1='[tpconf:NAME] %~ %# '`` in its environment (a ``.zshrc`` that sets a prompt
  wins); **other shells** get ``PS1='[tpconf:NAME] $ '``.

Only one shell can own a terminal: the reconciler runs at most one at a time.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import anyio
from anyio.abc import Process, TaskStatus

from tpconf.errors import ProcessError
from tpconf.pids import open_child
from tpconf.supervisor.process import ProcessExit

__all__ = ["choose_shell", "run_shell"]

log = logging.getLogger(__name__)

_FALLBACKS = ("/bin/bash", "/bin/sh")

_RCFILE = """\
# Written by tpconf for `shell: true`: your usual setup, then a prompt naming the deployment.
__tpconf_ps1='\\w\\$ '
if [ -f /etc/bash.bashrc ]; then . /etc/bash.bashrc; fi
if [ -f "$HOME/.bashrc" ]; then . "$HOME/.bashrc"; fi
if [ -n "$PS1" ]; then __tpconf_ps1=$PS1; fi
PS1="[tpconf:{label}] $__tpconf_ps1"
unset __tpconf_ps1
"""


def _runnable(path: str | None) -> bool:
    return bool(path) and os.path.isabs(path or "") and os.access(path or "", os.X_OK)


def choose_shell(local: Mapping[str, str] | None = None, shell: str | None = None) -> str:
    """``shell``, else ``$SHELL`` of the local environment (``local``, by default tpconf's own),
    else ``/bin/bash``, else ``/bin/sh``. Never the pod's ``SHELL``: the container's shell may
    not exist here, or be a program the pod chose to run on this machine."""
    local = os.environ if local is None else local
    for candidate in (shell, local.get("SHELL"), *_FALLBACKS):
        if candidate and _runnable(candidate):
            return candidate
    raise ProcessError("no shell found", hint="set $SHELL to the path of your shell")


def _label(name: str) -> str:
    """The deployment name as it may appear in a prompt: no prompt escapes, no expansions."""
    return re.sub(r"[^A-Za-z0-9._-]", "?", name)


@contextmanager
def _shell_command(
    shell: str, name: str, env: Mapping[str, str]
) -> Iterator[tuple[list[str], dict[str, str]]]:
    """The argv and environment that start ``shell`` interactively with the tpconf prompt."""
    env = dict(env)
    kind = Path(shell).name
    if kind == "bash":
        with tempfile.TemporaryDirectory(prefix="tpconf-shell-") as directory:
            rcfile = Path(directory, "bashrc")
            rcfile.write_text(_RCFILE.format(label=_label(name)), encoding="utf-8")
            yield [shell, "--rcfile", str(rcfile), "-i"], env
        return
    if kind == "zsh":
        env["PS1"] = f"[tpconf:{_label(name)}] %~ %# "
    else:
        env["PS1"] = f"[tpconf:{_label(name)}] $ "
    yield [shell, "-i"], env


def _terminal_fd(stdin: int | IO[Any] | None) -> int | None:
    """The fd of the terminal the shell will use, if it is our foreground terminal."""
    fd = 0 if stdin is None else stdin if isinstance(stdin, int) else stdin.fileno()
    try:
        return fd if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp() else None
    except OSError:
        return None


def _take_terminal_back(fd: int) -> None:
    """Make tpconf's group the foreground of ``fd`` again; SIGTTOU blocked while doing so."""
    try:
        if os.tcgetpgrp(fd) == os.getpgrp():
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
        try:
            os.tcsetpgrp(fd, os.getpgrp())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    except OSError as exc:
        log.warning("could not take the terminal back after the shell: %s", exc)


async def _hang_up(process: Process, name: str, *, hangup_grace: float, kill_grace: float) -> None:
    """An interactive shell ignores SIGTERM: SIGHUP it (it passes that on to its jobs)."""
    for sig, grace in ((signal.SIGHUP, hangup_grace), (signal.SIGKILL, kill_grace)):
        if process.returncode is not None:
            return
        log.info("%s: sending %s to the shell (pid %d)", name, sig.name, process.pid)
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            return
        with anyio.move_on_after(grace):
            await process.wait()
    if process.returncode is None:
        log.error("%s: the shell (pid %d) is still running after SIGKILL", name, process.pid)


async def run_shell(
    name: str,
    env: Mapping[str, str],
    *,
    cwd: str | None = None,
    wrapper: Sequence[str] = (),
    shell: str | None = None,
    hangup_grace: float = 2.0,
    kill_grace: float = 1.0,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> ProcessExit:
    """Run an interactive shell for deployment ``name`` until the user leaves it.

    ``env`` is the complete environment, ``wrapper`` goes in front (torsocks for inject-tcp).
    ``stdin``/``stdout``/``stderr`` default to tpconf's own (pass a pty in tests).
    ``task_status.started(pid)`` is called once the shell runs. On cancellation the shell gets
    SIGHUP, then SIGKILL, and the terminal is taken back; the cancellation is re-raised.
    """
    program = choose_shell(os.environ, shell)
    if wrapper and not _runnable(wrapper[0]):
        raise ProcessError(
            f"{name}: {wrapper[0]} (the method's wrapper) is not installed",
            hint="install the Debian/Ubuntu package that provides it, e.g. `torsocks`",
        )
    terminal = _terminal_fd(stdin)
    stopped = False
    with _shell_command(program, name, env) as (argv, shell_env):
        command = [*wrapper, *argv]
        try:
            # SIGHUP if tpconf dies: the shell hangs up its jobs as on a closed terminal.
            process = await open_child(
                command,
                death_signal=signal.SIGHUP,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=cwd,
                env=shell_env,
            )
        except OSError as exc:
            raise ProcessError(
                f"{name}: cannot start the shell {program}: {exc.strerror or exc}",
                hint="set $SHELL to the path of your shell",
            ) from exc
        log.info("%s: shell started, pid %d: %s", name, process.pid, shlex.join(command))
        try:
            task_status.started(process.pid)
            await process.wait()
        except anyio.get_cancelled_exc_class():
            stopped = True
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await _hang_up(process, name, hangup_grace=hangup_grace, kill_grace=kill_grace)
                with anyio.move_on_after(kill_grace):
                    await process.aclose()
                if terminal is not None:
                    _take_terminal_back(terminal)
    result = ProcessExit(name, process.pid, process.returncode, stopped=stopped)
    log.info("%s: shell %s", name, result.describe())
    return result
