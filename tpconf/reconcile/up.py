"""``tpconf up``: start what the file declares, follow its edits, tear down on a signal.

The session's root task group holds every unit. Before anything changes, ``up`` says which
contexts (and API servers) and namespaces it will touch, and refuses a context that
`allowed-contexts` does not list. The deployments started are the file's selection
(:class:`Selection`: names, profiles), which ``tpconf up NAME`` and ``tpconf down NAME`` change
while ``up`` runs (through the control socket).

The first SIGINT/SIGTERM stops the deployments in order (processes, forwards, tunnels, then the
proxies: swaps are restored) within ``shutdown_timeout``; a second one cancels at once (cleanup
still runs shielded, briefly). For scripted runs, docker compose's ``--abort-on-exit`` (the first
command to exit stops everything; its exit code is ``up``'s) and ``--exit-code-from NAME`` (the
same, with NAME's exit code) end ``up`` by themselves, as does a deployment that cannot start.
``up`` exits non-zero when every deployment failed.

The control socket also answers ``tpconf env`` and ``tpconf exec`` (what a command needs to run
as the deployment's process: :mod:`~tpconf.reconcile.launching`), and every process's output is
kept under ``.tpconf/logs/`` for ``tpconf logs``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio

from tpconf import collector, pids
from tpconf.config import ConfigFiles, DeploymentSpec, Project, load_project
from tpconf.errors import ConfigError, TpconfError
from tpconf.methods import REGISTRY, LaunchRequest
from tpconf.reconcile import control, state, units
from tpconf.reconcile.launching import HeldLaunches, command_prefix
from tpconf.reconcile.localpaths import outside_project
from tpconf.reconcile.loop import DeploymentState, Reconciler
from tpconf.reconcile.plan import Unit
from tpconf.reconcile.reporting import Reporter
from tpconf.reconcile.schemacopy import write_schema
from tpconf.reconcile.session import Session
from tpconf.reconcile.watch import config_changes
from tpconf.supervisor.output import LOGS_DIR, LogFiles, OutputSink, Stream, Tee
from tpconf.supervisor.process import ProcessExit, hurry

log = logging.getLogger(__name__)

#: ``up``'s exit code when it ends because deployments failed (as for any error).
EXIT_FAILED = 1
#: ``up``'s exit code after a second Ctrl-C forced it to stop (a shell's code for SIGINT).
EXIT_FORCED = 130


@dataclass(frozen=True)
class UpOptions:
    """How ``tpconf up`` runs, from its command line."""

    names: tuple[str, ...] = ()
    """Only these deployments (whatever their profiles); empty: the profiles decide."""
    profiles: tuple[str, ...] = ()
    """Active profiles: deployments with one of them start too."""
    watch: bool = True
    """Follow edits of the files."""
    abort_on_exit: bool = False
    """The first command that exits (or deployment that cannot start) stops everything."""
    exit_code_from: str | None = None
    """As ``abort_on_exit``; ``up`` exits with this deployment's exit code."""
    shutdown_timeout: float = 90.0

    @property
    def aborts(self) -> bool:
        return self.abort_on_exit or self.exit_code_from is not None


@dataclass
class Selection:
    """Which deployments of the file run: compose's rules (:meth:`Project.selected`), plus
    the ones ``tpconf up NAME`` added and ``tpconf down NAME`` removed while ``up`` runs."""

    names: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)

    def apply(self, project: Project) -> Project:
        base = project.selected(self.names, self.profiles)
        wanted = (set(base.names) | (self.added & set(project.names))) - self.removed
        chosen = tuple(spec for spec in project.deployments if spec.name in wanted)
        return replace(base, deployments=chosen)


def exit_code(result: ProcessExit) -> int:
    """A process's exit as a shell reports it: a signal N is 128 + N."""
    if result.returncode is None:
        return EXIT_FAILED
    return 128 - result.returncode if result.returncode < 0 else result.returncode


def snapshot(
    reconciler: Reconciler, session: Session, config: str, started: float
) -> state.Snapshot:
    """What ``tpconf status`` shows: one row per deployment of the last good file."""
    project = reconciler.project
    rows = [
        _row(spec, reconciler.deployments.get(spec.name))
        for spec in (project.deployments if project else ())
    ]
    return state.Snapshot(
        pid=os.getpid(),
        session=session.session_id,
        config=config,
        started=started,
        deployments=tuple(rows),
    )


def _row(spec: DeploymentSpec, dep: DeploymentState | None) -> state.DeploymentRow:
    proxy = dep.result(Unit.PROXY, units.ProxyReady) if dep else None
    tunnel = dep.result(Unit.TUNNEL, units.TunnelReady) if dep else None
    outbound = dep.result(Unit.OUTBOUND, units.OutboundReady) if dep else None
    process = dep.result(Unit.PROCESS, units.ProcessReady) if dep else None
    failure = dep.failure if dep else None
    retry = dep.retry if dep and failure else None
    return state.DeploymentRow(
        name=spec.name,
        namespace=proxy.request.namespace if proxy else spec.namespace or "",
        method=spec.method,
        operation=type(spec.operation).__name__.removesuffix("Op").lower(),
        pod=tunnel.link.pod.pod if tunnel else proxy.pod.pod if proxy else "",
        tunnel=tunnel.link.state.value if tunnel else "",
        exposes=tuple(str(m) for m in spec.expose),
        outbound=outbound.outbound.status() if outbound else "",
        process=process.status.describe() if process else "",
        error=failure.headline if failure else None if dep else "not started",
        retry_at=retry.at if retry else None,
        attempt=retry.attempt if retry else 0,
    )


class _Exits:
    """Hears every process exit (an :class:`OutputSink` that keeps nothing else) and ends a
    scripted run: compose's ``--abort-on-container-exit`` and ``--exit-code-from``."""

    def __init__(
        self,
        options: UpOptions,
        stop: Callable[[int | None], None],
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self._options = options
        self._stop = stop
        self._changed = changed
        self.code: int | None = None

    def write(self, name: str, line: str, *, stream: Stream = "stdout") -> None:
        pass

    def notice(self, name: str, text: str) -> None:
        pass

    def exited(self, name: str, result: ProcessExit) -> None:
        self._changed()  # the state file shows the exit (`status` of a crashed up reads it)
        wanted = self._options.exit_code_from
        if wanted == name:
            self.code = exit_code(result)  # also when it is stopped because another one ended
        if result.stopped or not self._options.aborts:
            return  # stopped by tpconf: an edit, or the end of the run
        self._stop(self.code if wanted is not None else exit_code(result))


class Up:
    """One running ``tpconf up``: its reconciler, selection, and what the control socket and
    the status read of it."""

    def __init__(
        self,
        files: ConfigFiles,
        session: Session,
        output: OutputSink,
        reporter: Reporter,
        options: UpOptions,
    ) -> None:
        self.files = files
        self.session = session
        self.reporter = reporter
        self.options = options
        self.selection = Selection(options.names, options.profiles)
        self.started = time.time()
        self.stop_requested = anyio.Event()
        self.code: int | None = None
        self.logs = LogFiles(session.state_dir / LOGS_DIR)
        self.exits = _Exits(options, self.request_stop, self._exited)
        self.output: OutputSink = Tee(output, self.logs, self.exits)
        self.launches = HeldLaunches()
        self.full: Project | None = None
        """The last good file, before selection."""
        self.reconciler: Reconciler | None = None
        self.seen_targets: set[str] = set()

    def load(self) -> Project:
        """The files, loaded and selected (raises their errors)."""
        self.full = load_project(self.files, methods=REGISTRY)
        return self.selection.apply(self.full)

    def check_options(self, project: Project) -> None:
        wanted = self.options.exit_code_from
        if wanted is None:
            return
        try:
            spec = project.deployment(wanted)
        except KeyError:
            raise TpconfError(
                f"--exit-code-from {wanted}: no such deployment is started "
                f"(started: {', '.join(project.names) or 'none'})",
                hint="name a deployment of the file, and select it (`tpconf up NAME`)",
            ) from None
        if spec.run is None:
            raise TpconfError(
                f"--exit-code-from {wanted}: deployment {wanted} has no `run` command",
                hint=f"give `{wanted}` a `run` command: its exit code is what up exits with",
            )

    def _exited(self) -> None:
        if self.reconciler is not None:
            self.changed()

    def request_stop(self, code: int | None = None) -> None:
        if code is not None and self.code is None:
            self.code = code
        self.stop_requested.set()

    async def announce_targets(self, project: Project) -> None:
        """Say which clusters and namespaces are about to change (new ones only)."""
        targets = await self.session.targets(project)
        fresh = [t for t in targets if str(t) not in self.seen_targets]
        self.seen_targets |= {str(t) for t in fresh}
        if fresh:
            self.reporter.clusters(fresh)

    # -- state ----------------------------------------------------------------------------------

    @property
    def running(self) -> Reconciler:
        assert self.reconciler is not None
        return self.reconciler

    def failed(self) -> list[str]:
        """The deployments that failed and wait for an edit (no retry pending)."""
        return [
            name
            for name, dep in self.running.deployments.items()
            if dep.failure is not None and dep.retry is None
        ]

    def all_failed(self) -> bool:
        project = self.running.project
        names = set(project.names) if project else set()
        return bool(names) and names <= set(self.failed())

    def changed(self) -> None:
        reconciler = self.running
        try:
            state.write(self.session.state_dir, self.snapshot())
        except OSError as exc:
            log.debug("cannot write state file: %s", exc)
        current = {
            name: ready.outbound
            for name, dep in reconciler.deployments.items()
            if (ready := dep.result(Unit.OUTBOUND, units.OutboundReady)) is not None
        }
        self.launches.prune(current)
        if self.options.aborts and self.failed() and not self.stop_requested.is_set():
            self.reporter.message(f"{', '.join(self.failed())} could not start: stopping")
            self.request_stop(EXIT_FAILED)

    def snapshot(self) -> state.Snapshot:
        return snapshot(self.running, self.session, str(self.files.main), self.started)

    async def apply(self, project: Project) -> None:
        await self.announce_targets(project)
        the_plan = await self.running.apply(project, announce=self.reporter.plan)
        if the_plan:
            self.reporter.status(self.snapshot())

    # -- the control socket ---------------------------------------------------------------------

    async def control(self, req: dict[str, object]) -> dict[str, object]:
        op = req.get("op")
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "status":
            return {"snapshot": self.snapshot().to_json()}
        if op == "env":
            return {"env": self.pod_env(str(req.get("name")))}
        if op == "exec":
            return self.exec_launch(str(req.get("name")))
        if op == "select":
            return await self.select(_names(req, "add"), _names(req, "remove"))
        raise TpconfError(f"unknown request {op!r}")

    def _not_running(self, name: str) -> TpconfError:
        running = ", ".join(self.running.running) or "none"
        return TpconfError(
            f"deployment {name} is not running (running: {running})",
            hint="`tpconf status` says why; `tpconf up NAME` starts a deployment of the file",
        )

    def pod_env(self, name: str) -> dict[str, str]:
        try:
            return self.running.pod_env(name)
        except KeyError:
            raise self._not_running(name) from None

    def exec_launch(self, name: str) -> dict[str, object]:
        """What ``tpconf exec NAME`` runs its command with: the pod side of the environment,
        the method's variables and the command's prefix (torsocks, proot)."""
        dep = self.running.deployments.get(name)
        outbound = dep.result(Unit.OUTBOUND, units.OutboundReady) if dep else None
        mounted = dep.result(Unit.VOLUMES, units.VolumesReady) if dep else None
        if dep is None or outbound is None or mounted is None:
            raise self._not_running(name)
        env = self.pod_env(name)
        spec = dep.ctx.spec
        request = LaunchRequest(spec, env, mounted.root, mounted.mounts)
        launch = self.launches.get(name, outbound.outbound, request)
        return {
            # A contained command (a container) gets the pod's side from its prefix.
            "env": {} if launch.contained else env,
            "launch_env": dict(launch.env),
            "prefix": list(command_prefix(spec, launch, mounted.root, mounted.mounts)),
            "contained": launch.contained,
        }

    async def select(self, add: Sequence[str], remove: Sequence[str]) -> dict[str, object]:
        """``tpconf up NAME`` / ``tpconf down NAME`` while ``up`` runs: start or stop some."""
        full = self.full
        assert full is not None
        full.selected([*add, *remove])  # an unknown name is refused here
        self.selection.added |= set(add)
        self.selection.removed -= set(add)
        self.selection.removed |= set(remove)
        self.selection.added -= set(remove)
        await self.apply(self.selection.apply(full))
        failures = {
            name: explain_failure(dep)
            for name in add
            if (dep := self.running.deployments.get(name)) is not None and dep.failure
        }
        started = [name for name in add if name not in failures]
        return {"started": started, "failed": failures, "stopped": list(remove)}


def explain_failure(dep: DeploymentState) -> str:
    """Why ``dep`` is not running, as the CLI prints it."""
    failure = dep.failure
    return failure.render() if failure else ""


def _names(req: dict[str, object], key: str) -> list[str]:
    value = req.get(key) or []
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise TpconfError(f"bad request: `{key}` must be a list of names")
    return [str(n) for n in value]


async def run_up(
    files: ConfigFiles,
    session: Session,
    output: OutputSink,
    reporter: Reporter,
    options: UpOptions | None = None,
    *,
    ready: Callable[[], None] | None = None,
) -> int:
    """Run until SIGINT/SIGTERM (or a shell deployment's shell exits, or a scripted run ends);
    return the exit code."""
    options = options or UpOptions()
    up = Up(files, session, output, reporter, options)
    # A broken file at start: nothing to keep, the CLI reports.
    project = up.load()
    up.check_options(project)
    state.check_dir(session.state_dir)
    await _refuse_a_second_up(session)
    reporter.warnings(project.warnings + outside_project(project))
    # Nothing has changed yet: a wrong cluster is refused here, before any unit starts.
    await up.announce_targets(project)
    await anyio.to_thread.run_sync(up.logs.clear)
    collector.tune_for_serving()  # from here on, the proxies serve connections

    stopped_in_order = False
    async with anyio.create_task_group() as root:
        reconciler = Reconciler(
            root, session, up.output, request_stop=up.request_stop, on_change=up.changed
        )
        up.reconciler = reconciler
        root.start_soon(session.warm, project)  # the first request, while the rest sets up
        root.start_soon(_signals, up.stop_requested, root.cancel_scope)
        await root.start(_record_children, session)
        await root.start(control.serve, session.state_dir, up.control)

        async def work() -> None:
            if options.watch:
                # Watching starts before the first pass: an edit saved while pods start is
                # applied as soon as the start finishes (apply takes turns).
                working.start_soon(_follow, up)
            # An interactive shell takes the terminal: no live lines drawn over its prompt.
            if not any(spec.shell for spec in project.deployments):
                reporter.starting(project.names)
            try:
                await reconciler.apply(project, announce=reporter.plan)
            finally:
                reporter.started()
            reporter.status(up.snapshot())
            # After the first pass, not before: building the schema costs a tenth of a second
            # of the start, for the editor's completion only.
            working.start_soon(_refresh_schema_copy, files.project_dir)
            if not reconciler.running and project.deployments:
                retrying = any(d.retry for d in reconciler.deployments.values())
                reporter.message(
                    "nothing has started yet: transient failures are retried by themselves"
                    if retrying
                    else "nothing could start; fix the errors above (the file is watched)"
                    if options.watch
                    else "nothing could start"
                )
            if up.all_failed() and not options.watch:
                up.request_stop(EXIT_FAILED)
            if ready is not None:
                ready()

        async with anyio.create_task_group() as working:
            working.start_soon(work)
            await up.stop_requested.wait()
            reporter.message("stopping (Ctrl-C again to force)")
            # A signal during start-up cancels the pods being waited for; their units undo
            # what they did (shielded), then everything left is stopped in order.
            working.cancel_scope.cancel()
        all_failed = up.all_failed()
        with anyio.move_on_after(options.shutdown_timeout) as scope:
            await reconciler.stop_all()
        code = up.exits.code if options.exit_code_from is not None else up.code
        if code is None and options.exit_code_from is not None:
            code = EXIT_FAILED  # it never ran to its end
        if scope.cancelled_caught:
            reporter.message("shutdown timed out; run `tpconf down` to finish cleaning up")
            code = code or EXIT_FAILED
        if all_failed:
            code = code or EXIT_FAILED
        up.launches.close()
        up.logs.close()
        await anyio.to_thread.run_sync(state.remove, session.state_dir)
        stopped_in_order = True
        root.cancel_scope.cancel()
    if not stopped_in_order:
        # A second signal cancelled everything: each unit undid its own part (shielded), but
        # the state is kept for `down`, which finishes whatever that left.
        reporter.message("forced to stop; run `tpconf down` to finish cleaning up")
        return EXIT_FORCED
    return code or 0


async def _refresh_schema_copy(project_dir: Path) -> None:
    try:
        await anyio.to_thread.run_sync(write_schema, project_dir)
    except OSError as exc:
        log.debug("cannot write the schema copy: %s", exc)


async def _follow(up: Up) -> None:
    async for _ in config_changes(up.files.watched(), stop=up.stop_requested):
        try:
            project = await anyio.to_thread.run_sync(up.load)
        except ConfigError as exc:
            up.reporter.config_error(exc)  # the last good state keeps running
            continue
        except TpconfError as exc:
            up.reporter.error(exc)
            continue
        up.reporter.warnings(project.warnings + outside_project(project))
        try:
            await up.apply(project)
        except TpconfError as exc:  # a context that is not allowed: nothing was changed
            up.reporter.error(exc)


async def _refuse_a_second_up(session: Session) -> None:
    """Two `up`s of one project would take over each other's proxies and swaps."""
    try:
        reply = await control.request(session.state_dir, {"op": "ping"})
    except TpconfError:
        return  # nobody answers: we are the only one
    raise TpconfError(
        f"tpconf up is already running for this project (pid {reply.get('pid')})",
        hint="use that one (it follows edits of the file; `tpconf up NAME` and `tpconf down "
        "NAME` start and stop its deployments), or stop it first",
    )


async def _record_children(session: Session, *, task_status: anyio.abc.TaskStatus[None]) -> None:
    """Record the children that lead a process group until the session ends: the kernel kills
    them if this process dies, and `tpconf down` stops what their groups leave."""
    with pids.recording(session.state_dir / state.CHILDREN_FILE):
        task_status.started()
        await anyio.sleep_forever()


async def _signals(stop: anyio.Event, root: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if stop.is_set():
                # Second signal: force. Units still clean up, shielded, but local processes
                # get SIGKILL now instead of the rest of their SIGTERM grace.
                hurry()
                root.cancel()
                return
            stop.set()
