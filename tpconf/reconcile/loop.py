"""The reconciler: runs each deployment's units in the session's task group, per the planner.

``Reconciler.apply(project)`` asks :func:`~tpconf.reconcile.plan.plan` what changed since the
last good config, then, for every touched deployment *in parallel*, stops units (reverse order),
updates some in place (exposes, routes), and starts units (dependency order) with ``tg.start``,
handing each the results of the units it needs (:func:`~tpconf.reconcile.units.starter`).
Deployments the plan does not mention are not touched at all: their tunnels and open
connections stay as they are.

A deployment whose start fails is reported, its already started units are stopped again, and it
is left out of the running state. If the failure is :class:`~tpconf.errors.Transient` (the API
server unreachable, a tunnel that dropped), it is retried by itself with back-off, shown in the
status as ``retrying in Ns (attempt N)``; otherwise the next edit of the file retries it. A unit
that fails after it started (a tunnel that cannot reconnect) is reported and marked failed; it
does not take the other deployments down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from tpconf.config import DeploymentSpec, Project
from tpconf.errors import Explanation, explain, retry_delay
from tpconf.methods import REGISTRY, MethodRuntime
from tpconf.methods import Services as MethodServices
from tpconf.reconcile import units
from tpconf.reconcile.plan import Action, Facets, Plan, Unit, desired_facets, plan
from tpconf.reconcile.session import Session
from tpconf.supervisor import OutputSink

log = logging.getLogger(__name__)

R = TypeVar("R")

Starter = Callable[[Unit, units.Context, units.Results], units.StartFn]
"""Binds a unit to its inputs (:func:`tpconf.reconcile.units.starter`; tests pass fakes)."""

#: Back-off of automatic retries after a transient failure stops growing here (seconds).
RETRY_CEILING = 30.0


@dataclass
class _Running:
    """A started unit: cancelling ``scope`` stops it; ``done`` is set once its cleanup ran."""

    scope: anyio.CancelScope
    done: anyio.Event = field(default_factory=anyio.Event)
    result: object = None
    failed: Explanation | None = None


@dataclass
class Retry:
    """A deployment waiting to be started again after a transient failure."""

    attempt: int
    at: float
    """When the attempt is due (``time.time()``)."""
    reason: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


@dataclass
class DeploymentState:
    """One deployment as the reconciler runs it."""

    ctx: units.Context
    units: dict[Unit, _Running] = field(default_factory=dict)
    error: Explanation | None = None
    retry: Retry | None = None
    """The automatic retry that is pending, if one is."""
    failures: int = 0
    """Transient start failures in a row (the back-off grows with them)."""

    def result(self, unit: Unit, kind: type[R]) -> R | None:
        """The result of ``unit`` if it runs."""
        running = self.units.get(unit)
        return running.result if running and isinstance(running.result, kind) else None

    @property
    def failure(self) -> Explanation | None:
        """Why the deployment is not fully working: its start error, else a failed unit's."""
        failed = [r.failed for r in self.units.values() if r.failed is not None]
        return self.error or (failed[0] if failed else None)


class _Status:
    """Passes ``started`` through and remembers the result, so errors after start stay local."""

    def __init__(self, inner: TaskStatus[None], running: _Running) -> None:
        self.inner = inner
        self.running = running
        self.started_once = False

    def started(self, value: object = None) -> None:
        self.started_once = True
        self.running.result = value
        self.inner.started()


class Reconciler:
    """Keeps the machine in line with the last good config."""

    def __init__(
        self,
        tg: TaskGroup,
        session: Session,
        output: OutputSink,
        *,
        request_stop: Callable[[], None] = lambda: None,
        starter: Starter = units.starter,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._tg = tg
        self._starter = starter
        self._on_change = on_change or (lambda: None)
        self._lock = anyio.Lock()
        self.deployments: dict[str, DeploymentState] = {}
        self.running: dict[str, Facets] = {}
        self.project: Project | None = None
        method_services = MethodServices(
            task_group=tg,
            notice=output.notice,
            session_id=session.session_id,
            project_id=session.project,
        )
        self.methods: Mapping[str, MethodRuntime] = {
            name: method.runtime(method_services) for name, method in REGISTRY.items()
        }
        self.services = units.Services(
            session=session, output=output, methods=self.methods, request_stop=request_stop
        )

    async def apply(
        self, project: Project, *, announce: Callable[[Plan], None] | None = None
    ) -> Plan:
        """Reconcile towards ``project``; returns the plan that was carried out.

        Every stop of the pass runs before any start (in parallel across deployments), so a
        port, a swap target or the terminal that moves from one deployment to another is free
        again before its new owner takes it.
        """
        async with self._lock:
            self.project = project
            the_plan = await self._pass(project, announce=announce)
            self._on_change()
            return the_plan

    async def _pass(
        self,
        project: Project,
        *,
        only: str | None = None,
        announce: Callable[[Plan], None] | None = None,
    ) -> Plan:
        desired = desired_facets(project, REGISTRY)
        running = self.running
        if only is not None:
            desired = {k: v for k, v in desired.items() if k == only}
            running = {k: v for k, v in running.items() if k == only}
        the_plan = plan(running, desired)
        if announce is not None and the_plan:
            announce(the_plan)  # before doing it, as `terraform apply` shows its plan
        specs = {d.name: d for d in project.deployments}
        by_deployment: dict[str, list[Action]] = {}
        for action in the_plan.actions:
            by_deployment.setdefault(action.deployment, []).append(action)
        for name in by_deployment:
            self._cancel_retry(name)
        async with anyio.create_task_group() as tg:
            for name, actions in by_deployment.items():
                tg.start_soon(self._stop_units, name, specs.get(name), actions)
        async with anyio.create_task_group() as tg:
            for name, actions in by_deployment.items():
                spec = specs.get(name)
                if spec is not None:
                    tg.start_soon(self._start_units, spec, project, actions, desired[name])
        return the_plan

    async def stop_all(self) -> None:
        """Stop every deployment, each in reverse unit order, all in parallel."""
        async with self._lock:
            async with anyio.create_task_group() as tg:
                for name in list(self.deployments):
                    self._cancel_retry(name)
                    tg.start_soon(self._stop_deployment, name)
            self._on_change()

    def pod_env(self, name: str) -> dict[str, str]:
        """Deployment ``name``'s pod environment; ``KeyError`` when it does not run (yet)."""
        state = self.deployments.get(name)
        tunnel = state.result(Unit.TUNNEL, units.TunnelReady) if state else None
        mounted = state.result(Unit.VOLUMES, units.VolumesReady) if state else None
        if state is None or tunnel is None or mounted is None:
            raise KeyError(name)
        return units.pod_env(state.ctx.spec, tunnel, mounted)

    async def _stop_deployment(self, name: str) -> None:
        state = self.deployments.get(name)
        if state is None:
            return
        for unit in sorted(state.units, reverse=True):
            await self._stop_unit(state, unit)
        self.deployments.pop(name, None)
        self.running.pop(name, None)

    async def _stop_units(
        self, name: str, spec: DeploymentSpec | None, actions: list[Action]
    ) -> None:
        state = self.deployments.get(name)
        if state is not None:
            for action in actions:
                if action.verb == "stop":
                    await self._stop_unit(state, action.unit)
        if spec is None:  # removed from the file
            if state is not None:
                await self._stop_deployment(name)
            self.deployments.pop(name, None)
            self.running.pop(name, None)
            self.services.notice(name, "stopped (removed from the file)")

    async def _start_units(
        self, spec: DeploymentSpec, project: Project, actions: list[Action], facets: Facets
    ) -> None:
        name = spec.name
        ctx = units.Context(spec=spec, project=project, services=self.services)
        state = self.deployments.get(name)
        if state is None or not state.units:
            state = DeploymentState(ctx=ctx, failures=state.failures if state else 0)
            self.deployments[name] = state
        state.ctx = ctx
        before = self.running.get(name)
        state.error = None
        started: list[Unit] = []
        try:
            for action in actions:
                if action.verb == "update":
                    running = state.units.get(action.unit)
                    if running is not None:
                        await units.update(action.unit, running.result, spec, project)
            for action in actions:
                if action.verb == "start":
                    await self._start_unit(state, action.unit)
                    started.append(action.unit)
        except Exception as exc:  # noqa: BLE001 - one deployment's failure must stay its own
            failure = explain(exc)
            state.error = failure
            whole = before is None or any(a.unit == Unit.PROXY for a in actions)
            for unit in sorted(state.units if whole else started, reverse=True):
                await self._stop_unit(state, unit)
            if whole or before is None:
                self.running.pop(name, None)
            else:
                # What did start keeps running; the old facets make the next pass retry the rest.
                self.running[name] = before
            if failure.transient:
                self._schedule_retry(state, failure, exc)
            else:
                state.failures = 0
                self.services.notice(name, f"failed: {failure.render()}")
            return
        state.failures = 0
        self.running[name] = facets
        if Unit.PROXY in started:
            self.services.notice(name, "ready")

    def _schedule_retry(
        self, state: DeploymentState, failure: Explanation, exc: BaseException
    ) -> None:
        state.failures += 1
        attempt = state.failures
        delay = retry_delay(exc, attempt, ceiling=RETRY_CEILING)
        retry = Retry(attempt=attempt, at=time.time() + delay, reason=failure.headline)
        state.retry = retry
        self.services.notice(
            state.ctx.name,
            f"failed: {failure.render()}\n(retrying in {delay:.0f}s, attempt {attempt})",
        )
        self._tg.start_soon(self._retry, state.ctx.name, retry, delay, name="retry")

    async def _retry(self, name: str, retry: Retry, delay: float) -> None:
        with retry.scope:
            await anyio.sleep(delay)
            async with self._lock:
                state = self.deployments.get(name)
                if self.project is None or state is None or state.retry is not retry:
                    return  # an edit or a stop came first
                state.retry = None  # this pass is the retry: nothing is pending any more
                await self._pass(self.project, only=name)
                self._on_change()

    def _cancel_retry(self, name: str) -> None:
        state = self.deployments.get(name)
        if state is not None and state.retry is not None:
            state.retry.scope.cancel()
            state.retry = None

    async def _start_unit(self, state: DeploymentState, unit: Unit) -> None:
        results = units.Results({u: r.result for u, r in state.units.items()})
        function = self._starter(unit, state.ctx, results)
        await self._tg.start(
            self._run_unit, state, unit, function, name=f"{state.ctx.name}:{unit.name.lower()}"
        )

    async def _run_unit(
        self,
        state: DeploymentState,
        unit: Unit,
        function: units.StartFn,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        running = _Running(scope=anyio.CancelScope())
        status = _Status(task_status, running)
        state.units[unit] = running
        try:
            with running.scope:
                await function(task_status=status)
        except Exception as exc:
            if not status.started_once:
                raise
            # After start, a unit's failure is its own deployment's problem, not the session's.
            running.failed = explain(exc)
            self.services.notice(
                state.ctx.name, f"{unit.name.lower()} failed: {running.failed.render()}"
            )
            log.debug("unit %s of %s failed", unit.name, state.ctx.name, exc_info=True)
            self._on_change()
        finally:
            running.done.set()
            if state.units.get(unit) is running and not status.started_once:
                del state.units[unit]

    async def _stop_unit(self, state: DeploymentState, unit: Unit) -> None:
        running = state.units.pop(unit, None)
        if running is None:
            return
        running.scope.cancel()
        # Not shielded: the unit's own cleanup is (in its task); a shutdown that times out, or a
        # second Ctrl-C, must be able to stop waiting for it.
        await running.done.wait()
