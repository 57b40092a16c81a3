"""What tpconf left in the cluster (``leftovers``, for ``tpconf status``) and ``down``, which
restores the swaps and deletes what tpconf created.

Both work from what is in the cluster only (labels and annotations), so they also see what a
``kill -9`` of ``tpconf up`` left.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tpconf.cluster import labels as L
from tpconf.cluster.client import Cluster, path
from tpconf.cluster.model import DownReport
from tpconf.cluster.objects import KINDS, Progress, delete, describe, ours, quiet
from tpconf.cluster.swaps import restore


@dataclass(frozen=True)
class Leftovers:
    """What this owner and project (or, with ``all``, anyone) has in the cluster right now."""

    swapped: tuple[tuple[str, str], ...] = ()
    """(namespace, Deployment) pairs that are swapped."""
    objects: tuple[tuple[str, str, str], ...] = ()
    """(kind, namespace, name) of the Deployments, Services and Secrets tpconf created."""

    def lines(self) -> list[str]:
        """Human-readable lines, for `tpconf status`."""
        return [f"swapped {describe('deployments', name, ns)}" for ns, name in self.swapped] + [
            describe(kind, name, ns) for kind, ns, name in self.objects
        ]


async def leftovers(
    cluster: Cluster, namespaces: Iterable[str], *, owner: str, project: str, all: bool = False
) -> Leftovers:
    """Find, without changing anything, what :func:`down` would restore and delete."""
    swapped: list[tuple[str, str]] = []
    objects: list[tuple[str, str, str]] = []
    # With ``all``, no owner and project: ``ours`` then accepts anyone's.
    wanted_owner, wanted_project = (None, None) if all else (owner, project)
    for ns in dict.fromkeys(namespaces):
        deployments = await cluster.request(
            "GET", path("deployments", ns), what=f'list the Deployments in namespace "{ns}"'
        )
        for dep in deployments.get("items") or []:
            annotations = dep["metadata"].get("annotations") or {}
            if L.SWAPPED_BY not in annotations:
                continue
            if all or L.is_our_swap(annotations, owner=owner, project=project):
                swapped.append((ns, dep["metadata"]["name"]))
        for kind in KINDS:
            listing = await cluster.request(
                "GET",
                path(kind, ns),
                what=f'list the {KINDS[kind]}s of tpconf in namespace "{ns}"',
                query={"labelSelector": L.MANAGED_SELECTOR},
            )
            for item in listing.get("items") or []:
                meta = item["metadata"]
                if meta.get("deletionTimestamp") or not ours(
                    item, owner=wanted_owner, project=wanted_project
                ):
                    continue
                objects.append((kind, ns, meta["name"]))
    return Leftovers(tuple(swapped), tuple(objects))


async def down(
    cluster: Cluster,
    namespaces: Iterable[str],
    *,
    owner: str,
    project: str,
    all: bool = False,
    progress: Progress = quiet,
) -> DownReport:
    """Restore the swaps and delete the objects this owner and project left behind.

    With ``all``, everything of tpconf in the namespaces, whoever created it. Idempotent: a
    second run reports nothing.
    """
    report = DownReport()
    found = await leftovers(cluster, namespaces, owner=owner, project=project, all=all)
    for ns, name in found.swapped:
        done = await restore(cluster, ns, name, progress=progress)
        report.restored.extend(d for d in done if not d.startswith("proxy "))
        report.deleted.extend(d.removeprefix("proxy ") for d in done if d.startswith("proxy "))
    if found.swapped:  # the restores deleted their proxies: look again
        found = await leftovers(cluster, namespaces, owner=owner, project=project, all=all)
    for kind, ns, name in found.objects:
        progress(f"deleting {describe(kind, name, ns)}")
        if await delete(cluster, kind, ns, name):
            report.deleted.append(describe(kind, name, ns))
    return report
