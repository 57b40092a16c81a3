"""run_shell on a real pseudo-terminal: the prompt names the deployment, env and exit code."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.orphans import killed_parent, survivors
from tests.supervisor.procs import alive
from tpconf.supervisor.process import ProcessExit
from tpconf.supervisor.shell import choose_shell, run_shell

pytestmark = pytest.mark.anyio


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    main, child = os.openpty()
    os.set_blocking(main, False)
    yield main, child
    for fd in (main, child):
        with contextlib.suppress(OSError):
            os.close(fd)


def drain(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


async def shell_session(shell: str, pty: tuple[int, int], script: str) -> tuple[ProcessExit, str]:
    main, child = pty
    env = {**os.environ, "GREETING": "hello from the pod"}
    output: list[str] = []
    os.write(main, script.encode())
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                while True:
                    output.append(drain(main))
                    await anyio.sleep(0.02)

            tg.start_soon(read)
            result = await run_shell(
                "web", env, shell=shell, stdin=child, stdout=child, stderr=child
            )
            tg.cancel_scope.cancel()
    return result, "".join(output) + drain(main)


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
async def test_the_shell_has_the_environment_a_prompt_naming_the_deployment_and_its_exit_code(
    shell: str, pty: tuple[int, int]
) -> None:
    result, output = await shell_session(shell, pty, 'echo "got: $GREETING"\nexit 7\n')
    assert result.returncode == 7
    assert not result.stopped
    assert "got: hello from the pod" in output
    assert "[tpconf:web] " in output


async def test_cancelling_the_shell_hangs_it_up(pty: tuple[int, int]) -> None:
    _, child = pty
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(20):
            pid = await tg.start(
                lambda task_status: run_shell(
                    "web",
                    dict(os.environ),
                    shell="/bin/bash",
                    stdin=child,
                    stdout=child,
                    stderr=child,
                    hangup_grace=1.0,
                    task_status=task_status,
                )
            )
        tg.cancel_scope.cancel()
    assert not alive(pid)


def test_the_shell_falls_back_to_bash_then_sh(tmp_path: Path) -> None:
    assert choose_shell({"SHELL": "/bin/sh"}) == "/bin/sh"
    assert choose_shell({"SHELL": "/bin/sh"}, "/bin/bash") == "/bin/bash"
    missing = str(tmp_path / "nosh")
    assert choose_shell({"SHELL": missing}, missing) in (os.environ.get("SHELL"), "/bin/bash")


# Runs an interactive bash on the pty given as argv[1], prints its pid, then waits to be killed.
SHELL_PARENT = """
import anyio, json, os, sys
from tpconf.supervisor.shell import run_shell

async def main():
    tty = int(sys.argv[1])
    async with anyio.create_task_group() as tg:
        pid = await tg.start(lambda task_status: run_shell(
            "web", dict(os.environ), shell="/bin/bash", stdin=tty, stdout=tty, stderr=tty,
            task_status=task_status))
        print(json.dumps([pid]), flush=True)

anyio.run(main)
"""


@pytest.mark.timeout(30)
def test_the_shell_is_hung_up_when_tpconf_dies_even_on_sigkill(pty: tuple[int, int]) -> None:
    # The terminal stays open (this test holds it): only the death signal can end the shell.
    _, child = pty
    with killed_parent(SHELL_PARENT, str(child), pass_fds=(child,)) as pids:
        assert survivors(pids) == [], "the interactive shell outlived tpconf"
