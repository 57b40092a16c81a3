"""``tpconf down`` and what ``tpconf status`` finds left behind: cleaning up after an ``up``.

``down`` works from what is on this machine and in the cluster, not from a running ``up``, so it
finishes what a crash (even ``kill -9``) left. The local side goes first and needs neither the
file nor the cluster: the process groups the crashed ``up``'s children left
(:func:`tpconf.pids.stop_leftovers`), its sshfs mounts, and vpn-tcp's iptables rules with the DNS
redirect; a machine whose kubeconfig is missing or whose API server is gone gets its DNS back all
the same. Then the namespaces of the last session (from its state file) and of the file as it is
now are searched for this owner's and project's objects; each target that fails is reported with
what to run to finish. Another project's running ``up`` keeps its mounts and rules.

``down NAME...`` works on those deployments only: a running ``up`` is asked to stop them (it
restores their swaps and keeps the others running); without one, only their objects in the
cluster are cleaned up (a crashed ``up``'s local leftovers all go, they serve nothing).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from tpconf import cluster, engine, pids, volumes
from tpconf.config import ConfigFiles, Project, load_project
from tpconf.errors import ConfigError, Explanation, TpconfError, explain
from tpconf.methods import REGISTRY
from tpconf.reconcile import control, state
from tpconf.reconcile.session import Session
from tpconf.redirect import routing

Target = tuple[str | None, str | None]
"""A (context, namespace) to clean; ``None`` is the kubeconfig's current one."""

#: Seconds ``status`` waits for the cluster before saying it could not check.
STATUS_TIMEOUT = 15.0


@dataclass
class DownReport:
    """What ``down`` did and what it could not do."""

    done: list[str] = field(default_factory=list)
    warnings: list[Explanation] = field(default_factory=list)
    failures: list[Explanation] = field(default_factory=list)


async def _last_session(session: Session, report: DownReport) -> state.Snapshot | None:
    """The crashed ``up``'s snapshot; refuses while an ``up`` runs here."""
    state.check_dir(session.state_dir)
    try:
        snapshot = state.read(session.state_dir)
    except TpconfError as exc:
        report.warnings.append(Explanation(f"{exc.message} (ignored)"))
        snapshot = None
    running = snapshot.pid if snapshot is not None and snapshot.alive else None
    if running is None:
        # A state file that is gone or unreadable proves nothing: ask the socket too.
        try:
            pid = (await control.request(session.state_dir, {"op": "ping"})).get("pid")
        except TpconfError:
            pid = None
        running = pid if isinstance(pid, int) else None
    if running is not None and running != os.getpid():
        raise TpconfError(
            f"tpconf up is still running here (pid {running})",
            hint="stop it with Ctrl-C (it cleans up); `tpconf down` is for what a crash left",
        )
    return snapshot


def _targets(
    snapshot: state.Snapshot | None,
    files: ConfigFiles | Path,
    report: DownReport,
    names: Sequence[str] = (),
) -> tuple[set[Target], set[str] | None]:
    """Where to clean, and (with ``names``) the entries and Deployments to clean only."""
    targets: set[Target] = set()
    only = set(names) if names else None
    if snapshot is not None:  # what the crashed `up` ran, whatever the file says now
        rows = [r for r in snapshot.deployments if only is None or r.name in only]
        targets |= {(None, row.namespace or None) for row in rows}
    try:
        project = load_project(files, methods=REGISTRY)
        if names:
            project = project.selected(names)
            assert only is not None
            only |= {spec.target for spec in project.deployments}
    except ConfigError as exc:
        if not targets:
            report.failures.append(
                Explanation(
                    f"{explain(exc).render()}\n(the cluster was not cleaned up: the file names "
                    "its namespaces)",
                    hint="fix the file, then run `tpconf down` again",
                    config=True,
                )
            )
            return set(), only
        report.warnings.append(
            Explanation(
                f"{explain(exc).render()}\n(cleaning up the namespaces of the last session)"
            )
        )
    else:
        targets |= {(d.context, d.namespace) for d in project.deployments}
    return targets or {(None, None)}, only


async def down(
    session: Session,
    files: ConfigFiles | Path,
    *,
    everything: bool = False,
    progress: Callable[[str], None] = lambda _: None,
    names: Sequence[str] = (),
) -> DownReport:
    """Clean up what this project left: locally first, then in each cluster namespace; with
    ``names``, those deployments only (see the module docstring)."""
    report = DownReport()
    if names:
        reply = await control.select(session.state_dir, remove=list(names))
        if reply is not None:
            stopped = reply.get("stopped")
            shown = ", ".join(str(n) for n in stopped) if isinstance(stopped, list) else ""
            report.done.append(f"stopped {shown} in the running tpconf up (the rest runs on)")
            return report
    snapshot = await _last_session(session, report)
    await local_leftovers(session.state_dir, report, project=session.project)
    targets, only = _targets(snapshot, files, report, names)
    for context, namespace in sorted(targets, key=str):
        try:
            client = await session.cluster(context, namespace)
            namespaces = [namespace or client.namespace]
            owner, project = session.owner, session.project
            result = await cluster.down(
                client,
                namespaces,
                owner=owner,
                project=project,
                all=everything,
                progress=progress,
                only=only,
            )
        except TpconfError as exc:
            failure = explain(exc)
            where = f"namespace {namespace}" if namespace else "the current namespace"
            report.failures.append(
                Explanation(
                    f"could not clean up {where} in the cluster: {failure.message}",
                    hint=(failure.hint + "; then " if failure.hint else "")
                    + "run `tpconf down` again to finish (this machine is cleaned up already)",
                )
            )
        else:
            report.done.extend(result.lines())
    if not report.failures and not names:
        await anyio.to_thread.run_sync(state.remove, session.state_dir)
    return report


async def local_leftovers(state_dir: Path, report: DownReport, *, project: str = "") -> None:
    """What a crashed ``up`` left on this machine: its children's process groups, the
    container method's containers of ``project``, its sshfs mounts, vpn-tcp's rules and DNS
    redirect. Each part is tried whatever the others did."""
    try:
        report.done.extend(
            await anyio.to_thread.run_sync(pids.stop_leftovers, state_dir / state.CHILDREN_FILE)
        )
    except (ValueError, TypeError) as exc:
        record = state_dir / state.CHILDREN_FILE
        report.warnings.append(
            Explanation(
                f"{record} is not a record of tpconf's children ({exc}): processes a crashed "
                "`tpconf up` started may still run",
                hint=f"look for them with `ps -ef`, then remove the file (`rm {record}`)",
            )
        )
    if project:
        await _container_leftovers(project, report)
    try:
        report.done.extend(f"unmounted {path}" for path in await volumes.remove_leftover_mounts())
    except TpconfError as exc:
        report.failures.append(explain(exc))
    try:
        removed = await routing.remove_leftovers()
        owner = None if removed else await routing.rules_owner()
    except TpconfError as exc:
        # Without root, rules a crashed `sudo tpconf up` left (and its DNS redirect) stay.
        report.done.append(f"vpn-tcp rules not checked ({exc.message}): run `sudo -E tpconf down`")
        report.done.append("  if a vpn-tcp `tpconf up` crashed here")
    else:
        report.done.extend(f"removed iptables chain {chain}" for chain in sorted(removed))
        if owner is not None and owner.running():
            report.done.append(f"kept the vpn-tcp rules of {owner.describe()}: it still runs")


async def _container_leftovers(project: str, report: DownReport) -> None:
    """The containers of `method: container` the project's crashed ``up`` left running (its
    docker commands were killed with it). No Docker here: there are none."""
    if shutil.which("docker") is None:
        return
    try:
        docker = engine.Docker.find()
        removed = await docker.remove({engine.LABEL_MANAGED: "true", engine.LABEL_PROJECT: project})
    except engine.EngineNotRunning:
        return  # nothing runs in an engine that does not run
    except TpconfError as exc:
        report.warnings.append(
            Explanation(
                f"containers of `method: container` not checked: {exc.message}",
                hint="if a `tpconf up` with `method: container` crashed here, remove its "
                "containers: `docker ps --filter label=tpconf.io/managed`, then `docker rm -f`",
            )
        )
        return
    report.done.extend(
        f"removed the {c.labels.get(engine.LABEL_ROLE, 'tpconf')} container {c.name} of "
        f"{c.labels.get(engine.LABEL_DEPLOYMENT, '?')}"
        for c in removed
    )


async def cluster_leftovers(
    session: Session, project: Project, names: Sequence[str] = ()
) -> list[str]:
    """What this project and user have in the cluster (a note instead if it cannot be read);
    with ``names``, what those deployments of ``project`` left."""
    lines: list[str] = []
    if names:
        project = project.selected(names)
    only = {*names, *(d.target for d in project.deployments)} if names else None
    targets = {(d.context, d.namespace) for d in project.deployments}
    try:
        with anyio.fail_after(STATUS_TIMEOUT):
            for context, namespace in sorted(targets, key=str):
                client = await session.cluster(context, namespace)
                owner, project_id = session.owner, session.project
                namespaces = [namespace or client.namespace]
                found = await cluster.leftovers(
                    client, namespaces, owner=owner, project=project_id, only=only
                )
                lines.extend(found.lines())
    except TimeoutError:
        return ["(could not check the cluster: timed out)"]
    except TpconfError as exc:
        return [f"(could not check the cluster: {explain(exc).render()})"]
    return lines
