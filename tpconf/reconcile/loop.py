"""The reconciler: runs each deployment's units in the session's task group, per the planner.

``Reconciler.apply(project)`` asks :func:`~tpconf.reconcile.plan.plan` what changed since the
last good config, then, for every touched deployment *in parallel*, stops units (reverse order),
updates some in place (exposes), and starts units (dependency order) with ``tg.start`` so each
unit's readiness is explicit and its start-up errors arrive here. Deployments the plan does not
mention are not touched at all: their tunnels and open connections stay as they are.

A deployment whose start fails is reported, its already started units are stopped again, and it
is left out of the running state, so the next edit of the file retries it. A unit that fails
after it started (a tunnel that cannot reconnect) is reported and marked failed; it does not take
the other deployments down.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus

from tpconf.config import DeploymentSpec, Project
from tpconf.errors import TpconfError
from tpconf.reconcile import units
from tpconf.reconcile.plan import Action, Facets, Plan, Unit, facets_of, plan
from tpconf.reconcile.session import Session
from tpconf.reconcile.vpn import SharedVpn

log = logging.getLogger(__name__)

UNIT_FUNCTIONS: Mapping[Unit, units.UnitFn] = {
    Unit.PROXY: units.proxy_unit,
    Unit.TUNNEL: units.tunnel_unit,
    Unit.OUTBOUND: units.outbound_unit,
    Unit.VOLUMES: units.volumes_unit,
    Unit.EXPOSE: units.expose_unit,
    Unit.EXPORT: units.export_unit,
    Unit.PROCESS: units.process_unit,
}


@dataclass
class _Running:
    """A started unit: cancelling ``scope`` stops it; ``done`` is set once its cleanup ran."""

    scope: anyio.CancelScope
    done: anyio.Event = field(default_factory=anyio.Event)
    failed: str | None = None


class _Status:
    """Passes ``started`` through and remembers it, so errors after start are kept local."""

    def __init__(self, inner: TaskStatus[None]) -> None:
        self.inner = inner
        self.started_once = False

    def started(self, value: None = None) -> None:
        self.started_once = True
        self.inner.started(value)


@dataclass
class DeploymentState:
    """One deployment as the reconciler runs it."""

    runtime: units.Runtime
    units: dict[Unit, _Running] = field(default_factory=dict)
    error: str | None = None


def describe(exc: BaseException) -> str:
    """A failure as the user sees it: tpconf's errors rendered, groups unwrapped, bugs named."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(describe(e) for e in exc.exceptions))
    if isinstance(exc, TpconfError):
        return exc.render()
    log.error("unexpected error", exc_info=exc)
    return f"{type(exc).__name__}: {exc} (this is a bug in tpconf, please report it)"


class Reconciler:
    """Keeps the machine in line with the last good config."""

    def __init__(
        self,
        tg: TaskGroup,
        session: Session,
        *,
        unit_functions: Mapping[Unit, units.UnitFn] = UNIT_FUNCTIONS,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._tg = tg
        self._session = session
        self._functions = unit_functions
        self._on_change = on_change or (lambda: None)
        self._lock = anyio.Lock()
        self.deployments: dict[str, DeploymentState] = {}
        self.running: dict[str, Facets] = {}
        self.project: Project | None = None
        self.vpn = SharedVpn(tg, session)
        session.vpn = self.vpn

    def plan_for(self, project: Project) -> Plan:
        """What :meth:`apply` would do (``tpconf plan`` shows this against nothing running)."""
        return plan(self.running, {d.name: self._facets(d, project) for d in project.deployments})

    @staticmethod
    def _facets(spec: DeploymentSpec, project: Project) -> Facets:
        facets = facets_of(spec)
        if spec.method == "vpn-tcp":
            # The file's `vpn:` ranges are routed through every vpn-tcp deployment.
            facets = dataclasses.replace(facets, routes=(facets.routes, project.vpn))
        return facets

    async def apply(
        self, project: Project, *, announce: Callable[[Plan], None] | None = None
    ) -> Plan:
        """Reconcile towards ``project``; returns the plan that was carried out.

        Every stop of the pass runs before any start (in parallel across deployments), so a
        port, a swap target or the terminal that moves from one deployment to another is free
        again before its new owner takes it.
        """
        async with self._lock:
            self.vpn.spec = project.vpn
            desired = {d.name: self._facets(d, project) for d in project.deployments}
            the_plan = plan(self.running, desired)
            if announce is not None and the_plan:
                announce(the_plan)  # before doing it, as `terraform apply` shows its plan
            specs = {d.name: d for d in project.deployments}
            by_deployment: dict[str, list[Action]] = {}
            for action in the_plan.actions:
                by_deployment.setdefault(action.deployment, []).append(action)
            async with anyio.create_task_group() as tg:
                for name, actions in by_deployment.items():
                    tg.start_soon(self._stop_units, name, specs.get(name), actions)
            async with anyio.create_task_group() as tg:
                for name, actions in by_deployment.items():
                    spec = specs.get(name)
                    if spec is not None:
                        tg.start_soon(self._start_units, spec, actions, desired[name])
            self.project = project
            self._on_change()
            return the_plan

    async def stop_all(self) -> None:
        """Stop every deployment, each in reverse unit order, all in parallel."""
        async with self._lock:
            async with anyio.create_task_group() as tg:
                for name in list(self.deployments):
                    tg.start_soon(self._stop_deployment, name)
            self._on_change()

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
            self._session.notice(name, "stopped (removed from the file)")

    async def _start_units(
        self, spec: DeploymentSpec, actions: list[Action], facets: Facets
    ) -> None:
        name = spec.name
        state = self.deployments.get(name)
        if state is None or not state.units:
            state = DeploymentState(runtime=units.Runtime(spec=spec, session=self._session))
            self.deployments[name] = state
        before = self.running.get(name)
        state.runtime.spec = spec
        state.error = None
        started: list[Unit] = []
        try:
            for action in actions:
                if action.verb == "update":
                    await self._update_unit(state, action)
            for action in actions:
                if action.verb == "start":
                    await self._start_unit(state, action.unit)
                    started.append(action.unit)
        except Exception as exc:  # noqa: BLE001 - one deployment's failure must stay its own
            message = describe(exc)
            self._session.notice(name, f"failed: {message}")
            state.error = message
            whole = before is None or any(a.unit == Unit.PROXY for a in actions)
            for unit in sorted(state.units if whole else started, reverse=True):
                await self._stop_unit(state, unit)
            if whole or before is None:
                self.running.pop(name, None)
            else:
                # What did start keeps running; the old facets make the next edit retry the rest.
                self.running[name] = before
            return
        self.running[name] = facets
        if Unit.PROXY in started:
            self._session.notice(name, "ready")

    async def _update_unit(self, state: DeploymentState, action: Action) -> None:
        if action.unit == Unit.EXPOSE:
            await units.update_exposes(state.runtime, state.runtime.spec)
        elif action.unit == Unit.OUTBOUND:
            await units.update_routes(state.runtime)

    async def _start_unit(self, state: DeploymentState, unit: Unit) -> None:
        function = self._functions[unit]
        await self._tg.start(
            self._run_unit, state, unit, function, name=f"{state.runtime.name}:{unit.name.lower()}"
        )

    async def _run_unit(
        self,
        state: DeploymentState,
        unit: Unit,
        function: units.UnitFn,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        running = _Running(scope=anyio.CancelScope())
        status = _Status(task_status)
        state.units[unit] = running
        try:
            with running.scope:
                await function(state.runtime, task_status=status)
        except Exception as exc:
            if not status.started_once:
                raise
            # After start, a unit's failure is its own deployment's problem, not the session's.
            message = describe(exc)
            running.failed = message
            self._session.notice(state.runtime.name, f"{unit.name.lower()} failed: {message}")
            log.debug("unit %s of %s failed", unit.name, state.runtime.name, exc_info=True)
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
