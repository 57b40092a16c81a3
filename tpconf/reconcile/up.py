"""``tpconf up``: start everything the file declares, follow its edits, tear down on a signal.

The session's root task group holds every unit. The first SIGINT/SIGTERM stops the deployments
in order (processes, forwards, tunnels, then the proxies: swaps are restored) within
``shutdown_timeout``; a second one cancels at once (cleanup still runs shielded, briefly).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio

from tpconf import pids
from tpconf.config import DeploymentSpec, Project, load_project
from tpconf.errors import ConfigError, TpconfError
from tpconf.methods import REGISTRY
from tpconf.reconcile import control, state, units
from tpconf.reconcile.localpaths import outside_project
from tpconf.reconcile.loop import DeploymentState, Reconciler
from tpconf.reconcile.plan import Unit
from tpconf.reconcile.reporting import Reporter
from tpconf.reconcile.session import Session
from tpconf.reconcile.watch import config_changes
from tpconf.supervisor import OutputSink

log = logging.getLogger(__name__)


def snapshot(
    reconciler: Reconciler, session: Session, config: Path, started: float
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
        config=str(config),
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


async def run_up(
    config: Path,
    session: Session,
    output: OutputSink,
    reporter: Reporter,
    *,
    watch: bool = True,
    shutdown_timeout: float = 90.0,
    ready: Callable[[], None] | None = None,
) -> int:
    """Run until SIGINT/SIGTERM (or a shell deployment's shell exits); return the exit code.

    ``watch=False`` only skips following edits of the file.
    """
    # A broken file at start: nothing to keep, the CLI reports.
    project = load_project(config, methods=REGISTRY)
    state.check_dir(session.state_dir)
    await _refuse_a_second_up(session)
    reporter.warnings(project.warnings + outside_project(project))
    started = time.time()
    code = 0

    async with anyio.create_task_group() as root:
        stop = anyio.Event()

        def changed() -> None:
            snap = snapshot(reconciler, session, config, started)
            try:
                state.write(session.state_dir, snap)
            except OSError as exc:
                log.debug("cannot write state file: %s", exc)

        reconciler = Reconciler(root, session, output, request_stop=stop.set, on_change=changed)
        root.start_soon(_signals, stop, root.cancel_scope)
        await root.start(_record_children, session)
        await root.start(control.serve, session.state_dir, partial(_control, reconciler))

        async def work() -> None:
            if watch:
                # Watching starts before the first pass: an edit saved while pods start is
                # applied as soon as the start finishes (apply takes turns).
                working.start_soon(_follow, config, reconciler, reporter, session, started, stop)
            await reconciler.apply(project, announce=reporter.plan)
            reporter.status(snapshot(reconciler, session, config, started))
            if not reconciler.running and project.deployments:
                retrying = any(d.retry for d in reconciler.deployments.values())
                reporter.message(
                    "nothing has started yet: transient failures are retried by themselves"
                    if retrying
                    else "nothing could start; fix the errors above (the file is watched)"
                )
            if ready is not None:
                ready()

        async with anyio.create_task_group() as working:
            working.start_soon(work)
            await stop.wait()
            reporter.message("stopping (Ctrl-C again to force)")
            # A signal during start-up cancels the pods being waited for; their units undo
            # what they did (shielded), then everything left is stopped in order.
            working.cancel_scope.cancel()
        with anyio.move_on_after(shutdown_timeout) as scope:
            await reconciler.stop_all()
        if scope.cancelled_caught:
            reporter.message("shutdown timed out; run `tpconf down` to finish cleaning up")
            code = 1
        await anyio.to_thread.run_sync(state.remove, session.state_dir)
        root.cancel_scope.cancel()
    return code


async def _follow(
    config: Path,
    reconciler: Reconciler,
    reporter: Reporter,
    session: Session,
    started: float,
    stop: anyio.Event,
) -> None:
    async for _ in config_changes(config, stop=stop):
        try:
            project: Project = await anyio.to_thread.run_sync(
                partial(load_project, config, methods=REGISTRY)
            )
        except ConfigError as exc:
            reporter.config_error(exc)  # the last good state keeps running
            continue
        except TpconfError as exc:
            reporter.error(exc)
            continue
        reporter.warnings(project.warnings + outside_project(project))
        the_plan = await reconciler.apply(project, announce=reporter.plan)
        if the_plan:
            reporter.status(snapshot(reconciler, session, config, started))


async def _refuse_a_second_up(session: Session) -> None:
    """Two `up`s of one project would take over each other's proxies and swaps."""
    try:
        reply = await control.request(session.state_dir, {"op": "ping"})
    except TpconfError:
        return  # nobody answers: we are the only one
    raise TpconfError(
        f"tpconf up is already running for this project (pid {reply.get('pid')})",
        hint="use that one (it follows edits of the file), or stop it first",
    )


def _control(reconciler: Reconciler, req: dict[str, object]) -> dict[str, object]:
    if req.get("op") == "ping":
        return {"pid": os.getpid()}
    if req.get("op") == "env":
        name = str(req.get("name"))
        try:
            return {"env": reconciler.pod_env(name)}
        except KeyError:
            known = ", ".join(reconciler.running) or "none"
            raise TpconfError(f"deployment {name} is not running (running: {known})") from None
    raise TpconfError(f"unknown request {req.get('op')!r}")


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
                root.cancel()  # second signal: force; units still clean up, shielded
                return
            stop.set()
