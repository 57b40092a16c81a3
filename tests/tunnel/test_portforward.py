"""The ``kubectl port-forward`` child, with a fake kubectl (a real child process) first on PATH."""

from __future__ import annotations

import os
import signal
import sys
from functools import partial
from pathlib import Path

import anyio
import pytest

from tests.orphans import killed_parent, survivors
from tpconf.errors import Forbidden, Transient, TunnelDown, TunnelError
from tpconf.tunnel import (
    PortForwardTarget,
    ProxyKeys,
    TunnelEvent,
    TunnelSettings,
    TunnelState,
    kubectl_port_forward,
    open_tunnel,
    port_forward_transport,
    run_tunnel,
)

from .peers import agent_server, tcp_server

pytestmark = pytest.mark.anyio

#: The kubectl child (the in-process port-forward has tests of its own: test_spdy, test_mux).
TARGET = PortForwardTarget(
    namespace="ns", resource="pod/agent", kubeconfig="/k/a:/k/b", context="ctx", in_process=False
)


@pytest.fixture
def fake_kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a fake ``kubectl`` first on PATH; returns the log of its starts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "kubectl"
    source = Path(__file__).with_name("fake_kubectl.py").read_text()
    script.write_text(f"#!{sys.executable}\n{source}")
    script.chmod(0o755)
    log = tmp_path / "kubectl.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_KUBECTL_LOG", str(log))
    return log


def _starts(log: Path) -> list[str]:
    """One line per kubectl start: its pid and arguments."""
    return log.read_text().splitlines()


def _pids(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in _starts(log)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_it_runs_kubectl_with_the_callers_settings_and_reaches_the_agent(
    fake_kubectl: Path, keys: ProxyKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with agent_server(keys) as agent:
        monkeypatch.setenv("FAKE_KUBECTL_TARGET", f"127.0.0.1:{agent.port}")
        async with kubectl_port_forward(TARGET) as forward:
            assert forward.local_port > 0
            async with open_tunnel(forward.endpoint, keys.credentials("u")) as tunnel:
                assert (await tunnel.run("echo ok")).stdout == b"ok\n"
        assert forward.returncode is not None  # stopped on exit
    (line,) = _starts(fake_kubectl)
    # A KUBECONFIG list is passed as kubectl reads one: `--kubeconfig` takes a single file.
    assert line.split(" ", 1)[1] == (
        "--context ctx -n ns port-forward pod/agent :8022 --address 127.0.0.1 KUBECONFIG=/k/a:/k/b"
    )


async def test_a_kubectl_that_ignores_sigterm_is_killed_with_its_group(
    fake_kubectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_KUBECTL_TARGET", "127.0.0.1:9")
    monkeypatch.setenv("FAKE_KUBECTL_MODE", "stubborn")
    with anyio.fail_after(10):
        async with kubectl_port_forward(TARGET, stop_grace=0.2) as forward:
            pgid = os.getpgid(forward.pid)
            assert pgid == forward.pid  # its own process group
        assert forward.returncode == -signal.SIGKILL
        with pytest.raises(ProcessLookupError):  # the grandchild went with the group
            for _ in range(100):
                os.killpg(pgid, 0)
                await anyio.sleep(0.02)


async def test_kubectl_exiting_reports_its_exit_so_it_can_be_restarted(
    fake_kubectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_KUBECTL_TARGET", "127.0.0.1:9")
    async with kubectl_port_forward(TARGET) as forward:
        os.kill(forward.pid, signal.SIGKILL)
        with anyio.fail_after(5):
            assert await forward.wait() == -signal.SIGKILL


async def test_kubectl_failing_before_forwarding_is_transient_and_quotes_it(
    fake_kubectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_KUBECTL_MODE", "fail")
    with pytest.raises(TunnelDown, match="pod is not running") as caught:
        async with kubectl_port_forward(TARGET):
            pytest.fail("should not forward")
    assert isinstance(caught.value, Transient)


async def test_rbac_refusal_names_the_missing_verb_and_resource(
    fake_kubectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_KUBECTL_MODE", "forbidden")
    with pytest.raises(Forbidden) as caught:
        async with kubectl_port_forward(TARGET):
            pytest.fail("should not forward")
    assert caught.value.hint is not None and "pods/portforward" in caught.value.hint


async def test_a_silent_kubectl_times_out_and_is_stopped(
    fake_kubectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_KUBECTL_MODE", "silent")
    with pytest.raises(TunnelDown, match="did not start forwarding within 0.3 s"):
        async with kubectl_port_forward(TARGET, ready_timeout=0.3):
            pytest.fail("should not forward")
    assert not any(_alive(pid) for pid in _pids(fake_kubectl))


async def test_a_missing_kubectl_is_a_permanent_error() -> None:
    target = PortForwardTarget(namespace="ns", resource="pod/a", kubectl="/nonexistent/kubectl")
    with pytest.raises(TunnelError, match="cannot run") as caught:
        async with kubectl_port_forward(target):
            pytest.fail("should not forward")
    assert not isinstance(caught.value, Transient)


async def test_the_supervisor_restarts_port_forward_when_kubectl_dies(
    fake_kubectl: Path, keys: ProxyKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[TunnelEvent] = []
    settings = TunnelSettings(backoff_initial=0.05, backoff_max=0.2, dial_wait=10)
    async with agent_server(keys) as agent, tcp_server("echo") as echo_port:
        monkeypatch.setenv("FAKE_KUBECTL_TARGET", f"127.0.0.1:{agent.port}")
        async with anyio.create_task_group() as tg:
            run = partial(run_tunnel, settings=settings, on_state=events.append)
            tunnel = await tg.start(run, port_forward_transport(TARGET), keys.credentials("u"))
            (first,) = _pids(fake_kubectl)
            os.kill(first, signal.SIGKILL)
            with anyio.fail_after(10):
                async with await tunnel.dial("127.0.0.1", echo_port) as stream:
                    await stream.send(b"back")
                    assert await stream.receive() == b"back"
            assert len(_pids(fake_kubectl)) >= 2
            assert TunnelState.RECONNECTING in [e.state for e in events]
            tg.cancel_scope.cancel()
    assert not any(_alive(pid) for pid in _pids(fake_kubectl))


# Runs one kubectl port-forward (the fake one first on PATH), prints its pid, waits to be killed.
FORWARDING_PARENT = """
import anyio, json
from tpconf.tunnel import PortForwardTarget, kubectl_port_forward

async def main():
    target = PortForwardTarget(namespace="ns", resource="pod/agent")
    async with kubectl_port_forward(target) as forward:
        print(json.dumps([forward.pid]), flush=True)
        await anyio.sleep(300)

anyio.run(main)
"""


@pytest.mark.timeout(30)
def test_kubectl_dies_with_tpconf_even_on_sigkill(
    fake_kubectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_KUBECTL_TARGET", "127.0.0.1:9")
    with killed_parent(FORWARDING_PARENT) as pids:
        assert pids == _pids(fake_kubectl)
        assert survivors(pids) == [], "kubectl port-forward outlived tpconf"
