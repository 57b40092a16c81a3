"""``tpconf down`` and what ``tpconf status`` finds left behind: cleaning up after an ``up``.

``down`` works from what is on this machine and in the cluster, not from a running ``up``, so it
finishes what a crash (even ``kill -9``) left: the namespaces of the last session (from its state
file) and of the file as it is now are searched for this owner's and project's objects. The local
side goes first (iptables rules and the DNS redirect of vpn-tcp, sshfs mounts) and does not need
the cluster, so a machine whose API server is gone gets its DNS back all the same; each cluster
target that fails is reported with what to run to finish.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from tpconf import cluster, volumes
from tpconf.config import Project, load_project
from tpconf.errors import ConfigError, Explanation, TpconfError, explain
from tpconf.methods import REGISTRY
from tpconf.reconcile import state
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


def _targets(session: Session, path: Path, report: DownReport) -> set[Target]:
    snapshot = state.read(session.state_dir)
    targets: set[Target] = set()
    if snapshot is not None:  # what the crashed `up` ran, whatever the file says now
        targets |= {(None, row.namespace or None) for row in snapshot.deployments}
    try:
        project = load_project(path, methods=REGISTRY)
    except ConfigError as exc:
        if not targets:
            raise
        report.warnings.append(
            Explanation(
                f"{explain(exc).render()}\n(cleaning up the namespaces of the last session)"
            )
        )
    else:
        targets |= {(d.context, d.namespace) for d in project.deployments}
    if snapshot is not None and snapshot.alive and snapshot.pid != os.getpid():
        raise TpconfError(
            f"tpconf up is still running here (pid {snapshot.pid})",
            hint="stop it with Ctrl-C (it cleans up); `tpconf down` is for what a crash left",
        )
    return targets or {(None, None)}


async def down(
    session: Session,
    path: Path,
    *,
    everything: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> DownReport:
    """Clean up what this project left: locally first, then in each cluster namespace."""
    report = DownReport()
    targets = _targets(session, path, report)
    report.done.extend(await local_leftovers())
    for context, namespace in sorted(targets, key=str):
        try:
            client = await session.cluster(context, namespace)
            namespaces = [namespace or client.namespace]
            owner, project = session.owner, session.project
            result = await cluster.down(
                client, namespaces, owner=owner, project=project, all=everything, progress=progress
            )
        except TpconfError as exc:
            failure = explain(exc)
            where = f"namespace {namespace}" if namespace else "the current namespace"
            report.failures.append(
                Explanation(
                    f"could not clean up {where}: {failure.message}",
                    hint=(failure.hint + "; then " if failure.hint else "")
                    + "run `tpconf down` again to finish",
                )
            )
        else:
            report.done.extend(result.lines())
    if not report.failures:
        await anyio.to_thread.run_sync(state.remove, session.state_dir)
    return report


async def local_leftovers() -> list[str]:
    """What a crashed `up` left on this machine: vpn-tcp rules and DNS redirect, sshfs mounts."""
    lines = [f"unmounted {path}" for path in await volumes.remove_leftover_mounts()]
    try:
        chains = await routing.remove_leftovers()
    except TpconfError as exc:
        # Without root, rules a crashed `sudo tpconf up` left (and its DNS redirect) stay.
        lines.append(f"vpn-tcp rules not checked ({exc.message}): run `sudo -E tpconf down` if")
        lines.append("  a vpn-tcp `tpconf up` crashed here")
    else:
        lines += [f"removed iptables chain {chain}" for chain in sorted(chains)]
    return lines


async def cluster_leftovers(session: Session, project: Project) -> list[str]:
    """What this project and user have in the cluster (a note instead if it cannot be read)."""
    lines: list[str] = []
    targets = {(d.context, d.namespace) for d in project.deployments}
    try:
        with anyio.fail_after(STATUS_TIMEOUT):
            for context, namespace in sorted(targets, key=str):
                client = await session.cluster(context, namespace)
                owner, project_id = session.owner, session.project
                namespaces = [namespace or client.namespace]
                found = await cluster.leftovers(client, namespaces, owner=owner, project=project_id)
                lines.extend(found.lines())
    except TimeoutError:
        return ["(could not check the cluster: timed out)"]
    except TpconfError as exc:
        return [f"(could not check the cluster: {explain(exc).render()})"]
    return lines
