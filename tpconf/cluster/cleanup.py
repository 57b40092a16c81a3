"""What tpconf left in the cluster (``leftovers``, for ``tpconf status``) and ``down``, which
restores the swaps, deletes what tpconf created, releases the keys Secrets of ``existing``
Deployments (those Deployments mount them, so they stay) and drops this developer's hold on
intercepted Deployments (restored when nobody else holds them).

Both work from what is in the cluster only (labels and annotations), so they also see what a
``kill -9`` of ``tpconf up`` left. ``only`` narrows them to some deployments of a project
(``tpconf down NAME``): the entries' names and the Kubernetes Deployments they use.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import partial

from tpconf.cluster import intercepts as I
from tpconf.cluster import labels as L
from tpconf.cluster.client import Cluster, path
from tpconf.cluster.model import DownReport
from tpconf.cluster.objects import KINDS, Progress, delete, describe, get, ours, quiet, released
from tpconf.cluster.proxies import release
from tpconf.cluster.swaps import restore


def _in(only: Collection[str] | None, *values: str | None) -> bool:
    """Whether one of ``values`` (label values or Deployment names) is in ``only`` (``None``:
    everything is)."""
    if only is None:
        return True
    wanted = {L.label_value(name) for name in only}
    return any(value is not None and L.label_value(value) in wanted for value in values)


def _labelled(labels: Mapping[str, str], only: Collection[str] | None) -> bool:
    return _in(only, labels.get(L.DEPLOYMENT), labels.get(L.EXISTING))


@dataclass(frozen=True)
class Leftovers:
    """What this owner and project (or, with ``all``, anyone) has in the cluster right now."""

    swapped: tuple[tuple[str, str], ...] = ()
    """(namespace, Deployment) pairs that are swapped."""
    objects: tuple[tuple[str, str, str], ...] = ()
    """(kind, namespace, name) of the Deployments, Services and Secrets tpconf created."""
    claimed: tuple[tuple[str, str], ...] = ()
    """(namespace, Secret) of the keys Secrets of ``existing`` Deployments still claimed."""
    intercepted: tuple[tuple[str, str], ...] = ()
    """(namespace, Deployment) pairs intercepted by this owner and project (``all``: anyone)."""

    def lines(self) -> list[str]:
        """Human-readable lines, for `tpconf status`."""
        return (
            [f"swapped {describe('deployments', name, ns)}" for ns, name in self.swapped]
            + [f"intercepted {describe('deployments', name, ns)}" for ns, name in self.intercepted]
            + [describe(kind, name, ns) for kind, ns, name in self.objects]
            + [f"claimed {describe('secrets', name, ns)}" for ns, name in self.claimed]
        )


async def leftovers(
    cluster: Cluster,
    namespaces: Iterable[str],
    *,
    owner: str,
    project: str,
    all: bool = False,
    only: Collection[str] | None = None,
) -> Leftovers:
    """Find, without changing anything, what :func:`down` would restore, delete and release;
    with ``only``, just what belongs to those entries and Deployments."""
    swapped: list[tuple[str, str]] = []
    objects: list[tuple[str, str, str]] = []
    claimed: list[tuple[str, str]] = []
    intercepted: list[tuple[str, str]] = []
    # With ``all``, no owner and project: ``ours`` then accepts anyone's.
    wanted_owner, wanted_project = (None, None) if all else (owner, project)
    for ns in dict.fromkeys(namespaces):
        deployments = await cluster.request(
            "GET", path("deployments", ns), what=f'list the Deployments in namespace "{ns}"'
        )
        for dep in deployments.get("items") or []:
            annotations = dep["metadata"].get("annotations") or {}
            name = dep["metadata"]["name"]
            if not _in(only, name):
                continue
            if I.ORIGINAL_TEMPLATE in annotations and (
                all
                or await get(cluster, "leases", ns, I.lease_name(name, owner, project))
                # Nobody holds it (its last developer crashed while leaving): anyone restores.
                or not await I.holders(cluster, ns, name)
            ):
                intercepted.append((ns, name))
            if L.SWAPPED_BY not in annotations:
                continue
            if all or L.is_our_swap(annotations, owner=owner, project=project):
                swapped.append((ns, name))
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
                labels = meta.get("labels") or {}
                if not _labelled(labels, only):
                    continue
                if I.INTERCEPTED in labels:
                    continue  # shared by an intercept's developers: the last one deletes it
                if L.EXISTING not in labels:
                    objects.append((kind, ns, meta["name"]))
                elif not released(item):
                    claimed.append((ns, meta["name"]))
        # A join cut short leaves its Lease and keys Secret where no restore looks.
        restoring = {name for namespace, name in intercepted if namespace == ns}
        objects += await I.orphans(
            cluster, ns, owner=wanted_owner, project=wanted_project, restoring=restoring
        )
    return Leftovers(tuple(swapped), tuple(objects), tuple(claimed), tuple(intercepted))


async def down(
    cluster: Cluster,
    namespaces: Iterable[str],
    *,
    owner: str,
    project: str,
    all: bool = False,
    progress: Progress = quiet,
    only: Collection[str] | None = None,
) -> DownReport:
    """Restore the swaps, delete the objects and release the ``existing`` keys Secrets this owner
    and project left behind.

    With ``all``, everything of tpconf in the namespaces, whoever created it. Idempotent: a
    second run reports nothing.
    """
    report = DownReport()
    look = partial(leftovers, cluster, namespaces, owner=owner, project=project, all=all, only=only)
    found = await look()
    for ns, name in found.intercepted:
        if all:
            await I.forget_leases(cluster, ns, name)
        else:
            await delete(cluster, "leases", ns, I.lease_name(name, owner, project))
        report.restored.extend(await I.restore_unheld(cluster, ns, name, progress=progress))
    for ns, name in found.swapped:
        done = await restore(cluster, ns, name, progress=progress)
        report.restored.extend(d for d in done if not d.startswith("proxy "))
        report.deleted.extend(d.removeprefix("proxy ") for d in done if d.startswith("proxy "))
    if found.swapped:  # the restores deleted their proxies: look again
        found = await look()
    for kind, ns, name in found.objects:
        progress(f"deleting {describe(kind, name, ns)}")
        if await delete(cluster, kind, ns, name):
            report.deleted.append(describe(kind, name, ns))
    for ns, name in found.claimed:
        secret = await get(cluster, "secrets", ns, name)
        freed = None if secret is None else await release(cluster, secret, progress=progress)
        if freed is not None:
            report.released.append(freed)
    return report
