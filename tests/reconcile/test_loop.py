"""The reconciler with fake units: ordering, failure containment, shutdown, the control socket.

Scope: `Reconciler` and `control` only, with units that record what happens to them; the real
units are covered against the real cluster in tests/e2e.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from anyio.abc import TaskStatus

from tpconf.config import Project, parse_project
from tpconf.errors import ClusterUnreachable, ProcessError, retry_delay
from tpconf.methods import REGISTRY
from tpconf.reconcile import control
from tpconf.reconcile.loop import Reconciler
from tpconf.reconcile.plan import Unit
from tpconf.reconcile.session import Session
from tpconf.reconcile.units import Context, Results, StartFn
from tpconf.supervisor import CaptureSink

pytestmark = pytest.mark.anyio


def project(text: str, tmp_path: Path) -> Project:
    return parse_project(
        "version: 1\ndeployments:\n" + text, base_dir=tmp_path, methods=REGISTRY, env={}
    )


class Recorder:
    """Fake units: every start and stop is recorded; ``fail`` makes a start raise."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.fail: dict[tuple[str, Unit], BaseException] = {}
        self.cleanup_delay = 0.0

    def starter(self, unit: Unit, ctx: Context, results: Results) -> StartFn:
        """A stand-in for :func:`tpconf.reconcile.units.starter`."""
        name = ctx.name

        async def run(*, task_status: TaskStatus[object]) -> None:
            error = self.fail.get((name, unit))
            if error is not None:
                raise error
            self.events.append(("start", name, unit.name))
            try:
                task_status.started(object())
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(self.cleanup_delay)
                self.events.append(("stop", name, unit.name))

        return run

    def reconciler(self, tg: anyio.abc.TaskGroup, session: Session) -> Reconciler:
        return Reconciler(tg, session, CaptureSink(), starter=self.starter)


@pytest.fixture
def session(tmp_path: Path) -> Session:
    return Session(project_dir=tmp_path, kubectl="kubectl")


async def test_a_start_error_in_a_task_group_fails_only_its_deployment(
    session: Session, tmp_path: Path
) -> None:
    rec = Recorder()
    rec.fail[("a", Unit.PROCESS)] = ExceptionGroup(
        "unit", [ProcessError("a: command not found: nope")]
    )
    async with anyio.create_task_group() as tg:
        reconciler = rec.reconciler(tg, session)
        await reconciler.apply(project("  a: {new: true}\n  b: {new: true}\n", tmp_path))
        assert set(reconciler.running) == {"b"}
        error = reconciler.deployments["a"].error
        assert error is not None and error.message == "a: command not found: nope"
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
        reconciler = rec.reconciler(tg, session)
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
        reconciler = rec.reconciler(tg, session)
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
        reconciler = rec.reconciler(tg, session)
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
    async def handler(req: dict[str, object]) -> dict[str, object]:
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


class _Flaky(ClusterUnreachable):
    delay = 0.05


async def test_a_transient_start_failure_is_retried_by_itself_with_backoff(
    session: Session, tmp_path: Path
) -> None:
    rec = Recorder()
    rec.fail[("a", Unit.TUNNEL)] = _Flaky("cannot reach the API server")
    async with anyio.create_task_group() as tg:
        reconciler = rec.reconciler(tg, session)
        await reconciler.apply(project("  a: {new: true}\n", tmp_path))
        state = reconciler.deployments["a"]
        assert "a" not in reconciler.running
        assert state.retry is not None and state.retry.attempt == 1
        assert state.error is not None and state.error.transient
        # Still failing at the first retry: the second waits twice as long.
        with anyio.fail_after(5):
            while reconciler.deployments["a"].failures < 2:  # noqa: ASYNC110 - polls a fake
                await anyio.sleep(0.01)
        retry = reconciler.deployments["a"].retry
        assert retry is not None and retry.attempt == 2
        del rec.fail[("a", Unit.TUNNEL)]
        with anyio.fail_after(5):
            while "a" not in reconciler.running:  # noqa: ASYNC110 - polls a fake
                await anyio.sleep(0.01)
        state = reconciler.deployments["a"]
        assert state.retry is None and state.error is None and state.failures == 0
        assert ("start", "a", "PROCESS") in rec.events
        await reconciler.stop_all()
        tg.cancel_scope.cancel()


async def test_a_permanent_start_failure_waits_for_an_edit(
    session: Session, tmp_path: Path
) -> None:
    rec = Recorder()
    rec.fail[("a", Unit.PROXY)] = ProcessError("no such thing")
    async with anyio.create_task_group() as tg:
        reconciler = rec.reconciler(tg, session)
        await reconciler.apply(project("  a: {new: true}\n", tmp_path))
        assert reconciler.deployments["a"].retry is None
        await anyio.sleep(0.2)
        assert ("start", "a", "PROXY") not in rec.events
        await reconciler.stop_all()
        tg.cancel_scope.cancel()


def test_the_backoff_doubles_from_the_errors_delay_up_to_a_ceiling() -> None:
    assert [retry_delay(_Flaky("x"), n, ceiling=0.3) for n in (1, 2, 3, 4)] == [
        0.05,
        0.1,
        0.2,
        0.3,
    ]
