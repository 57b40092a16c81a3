"""The reconciler with fake units: ordering, failure containment, shutdown, the control socket.

Scope: `Reconciler` and `control` only, with units that record what happens to them; the real
units are covered against the real cluster in tests/e2e.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus

from tpconf.config import Project, parse_project
from tpconf.errors import ProcessError
from tpconf.reconcile import control
from tpconf.reconcile.loop import Reconciler
from tpconf.reconcile.plan import Unit
from tpconf.reconcile.session import Session
from tpconf.reconcile.units import Runtime
from tpconf.supervisor import CaptureSink

pytestmark = pytest.mark.anyio


def project(text: str, tmp_path: Path) -> Project:
    return parse_project("version: 1\ndeployments:\n" + text, base_dir=tmp_path, env={})


class Recorder:
    """Fake units: every start and stop is recorded; ``fail`` makes a start raise."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.fail: dict[tuple[str, Unit], BaseException] = {}
        self.cleanup_delay = 0.0

    def unit(self, unit: Unit) -> Callable[..., Any]:
        async def run(rt: Runtime, *, task_status: TaskStatus[None]) -> None:
            error = self.fail.get((rt.name, unit))
            if error is not None:
                raise error
            self.events.append(("start", rt.name, unit.name))
            try:
                task_status.started()
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(self.cleanup_delay)
                self.events.append(("stop", rt.name, unit.name))

        return run

    def functions(self) -> dict[Unit, Callable[..., Any]]:
        return {unit: self.unit(unit) for unit in Unit}


@pytest.fixture
def session(tmp_path: Path) -> Session:
    return Session(project_dir=tmp_path, output=CaptureSink(), kubectl="kubectl")


async def test_a_start_error_in_a_task_group_fails_only_its_deployment(
    session: Session, tmp_path: Path
) -> None:
    rec = Recorder()
    rec.fail[("a", Unit.PROCESS)] = ExceptionGroup(
        "unit", [ProcessError("a: command not found: nope")]
    )
    async with anyio.create_task_group() as tg:
        reconciler = Reconciler(tg, session, unit_functions=rec.functions())
        await reconciler.apply(project("  a: {new: true}\n  b: {new: true}\n", tmp_path))
        assert set(reconciler.running) == {"b"}
        assert reconciler.deployments["a"].error == "a: command not found: nope"
        # a's units that had started were stopped again, in reverse order; b is untouched.
        a_events = [(verb, unit) for verb, name, unit in rec.events if name == "a"]
        assert a_events[-1] == ("stop", "PROXY")
        assert ("stop", "b", "PROXY") not in rec.events
        await reconciler.stop_all()
        tg.cancel_scope.cancel()


async def test_every_stop_of_a_pass_comes_before_any_start(
    session: Session, tmp_path: Path
) -> None:
    rec = Recorder()
    async with anyio.create_task_group() as tg:
        reconciler = Reconciler(tg, session, unit_functions=rec.functions())
        await reconciler.apply(project("  a: {new: true, run: x}\n", tmp_path))
        rec.events.clear()
        # a goes, b comes (taking over a's role): all of a is gone before b starts.
        await reconciler.apply(project("  b: {new: true, run: x}\n", tmp_path))
        verbs = [verb for verb, _, _ in rec.events]
        assert verbs == ["stop"] * len(Unit) + ["start"] * len(Unit)
        assert {name for verb, name, _ in rec.events if verb == "stop"} == {"a"}
        await reconciler.stop_all()
        tg.cancel_scope.cancel()


async def test_a_failed_run_change_keeps_the_rest_and_is_retried_by_the_next_edit(
    session: Session, tmp_path: Path
) -> None:
    rec = Recorder()
    async with anyio.create_task_group() as tg:
        reconciler = Reconciler(tg, session, unit_functions=rec.functions())
        await reconciler.apply(project("  a: {new: true, run: one}\n", tmp_path))
        rec.fail[("a", Unit.PROCESS)] = ProcessError("a: command not found: two")
        rec.events.clear()
        await reconciler.apply(project("  a: {new: true, run: two}\n", tmp_path))
        assert rec.events == [("stop", "a", "PROCESS")]  # the proxy and tunnel stay
        assert set(reconciler.deployments["a"].units) == set(Unit) - {Unit.PROCESS}
        del rec.fail[("a", Unit.PROCESS)]
        rec.events.clear()
        await reconciler.apply(project("  a: {new: true, run: three}\n", tmp_path))
        assert rec.events == [("start", "a", "PROCESS")]
        await reconciler.stop_all()
        tg.cancel_scope.cancel()


async def test_a_shutdown_deadline_is_not_held_up_by_slow_cleanups(
    session: Session, tmp_path: Path
) -> None:
    rec = Recorder()
    rec.cleanup_delay = 0.5
    async with anyio.create_task_group() as tg:
        reconciler = Reconciler(tg, session, unit_functions=rec.functions())
        await reconciler.apply(project("  a: {new: true}\n", tmp_path))
        before = anyio.current_time()
        with anyio.move_on_after(0.2) as scope:
            await reconciler.stop_all()
        assert scope.cancelled_caught
        assert anyio.current_time() - before < 0.5 * len(Unit)
        tg.cancel_scope.cancel()
    # Each unit still finished its own (shielded) cleanup before the task group closed.
    assert ("stop", "a", "PROXY") in rec.events


async def test_the_control_socket_survives_bad_requests_and_handler_bugs(tmp_path: Path) -> None:
    def handler(req: dict[str, object]) -> dict[str, object]:
        if req.get("op") == "boom":
            raise AttributeError("a bug")
        return {"pong": req.get("op")}

    async with anyio.create_task_group() as tg:
        path = await tg.start(control.serve, tmp_path / "state", handler)
        assert path.stat().st_mode & 0o777 == 0o600
        for raw in (b"[1]", b"not json", b'{"op": "boom"}'):
            async with await anyio.connect_unix(path) as stream:
                await stream.send(raw)
                reply = json.loads(await stream.receive())
                assert "error" in reply
        async with await anyio.connect_unix(path) as stream:  # hangs up without asking
            pass
        assert await control.request(tmp_path / "state", {"op": "ping"}) == {"pong": "ping"}
        tg.cancel_scope.cancel()
    assert not (tmp_path / "state" / control.SOCKET_NAME).exists()
