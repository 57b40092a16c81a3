"""The ``swap`` operation and its undoing, ``restore``.

Crash safety (docs/architecture.md, "State and recovery"; Telepresence 1 issues #260, #1026,
#1362):

- ``swap`` records who swapped and the original replica count in annotations on the original
  Deployment *before* changing anything (one PATCH, conditional on the resourceVersion it read
  the replicas from), then creates the proxy, then scales the original to 0. Whatever step a
  ``kill -9`` interrupts, ``down`` finds the annotations and puts back exactly those replicas.
- A Deployment already swapped by someone else is refused (:class:`~tpconf.errors.AlreadySwapped`).
  One swapped by this owner and project (a crashed earlier ``tpconf up``) is *adopted*: the
  recorded replica count is kept (the live one is 0 by then), the proxy is re-created for the new
  session, so the next ``up`` simply carries on and ``down`` restores the right count.
- ``restore`` is one PATCH too: replicas back and our annotations removed together.

The proxy Deployment owns its keys Secret, as in ``new`` (see :mod:`tpconf.cluster.proxies`).
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio

from tpconf import errors
from tpconf.cluster import labels as L
from tpconf.cluster import manifests as M
from tpconf.cluster.client import MERGE_PATCH, Cluster, path
from tpconf.cluster.model import Proxy, ProxyRequest, Swap
from tpconf.cluster.objects import (
    JSON,
    Progress,
    apply,
    delete,
    describe,
    get,
    ours,
    quiet,
    retry_conflicts,
)

#: How long a failed swap may take to put the original back before the error is raised.
UNDO_TIMEOUT = 30


def _swap_refusal(
    name: str, namespace: str, annotations: Mapping[str, str]
) -> errors.AlreadySwapped:
    who = annotations.get(L.SWAPPED_BY, "someone")
    proxy = annotations.get(L.PROXY_DEPLOYMENT, M.swap_proxy_name(name))
    return errors.AlreadySwapped(
        f'Deployment "{name}" in namespace "{namespace}" is already swapped by {who} '
        f"(proxy Deployment {proxy!r}, original replicas "
        f"{annotations.get(L.ORIGINAL_REPLICAS, '?')})",
        hint=f"{who} restores it with `tpconf down` in their project; `tpconf down --all` "
        f"restores every swap in the namespaces of telepresence.yaml (`namespace: {namespace}`), "
        "whoever made it",
    )


async def _record_swap(
    cluster: Cluster, req: ProxyRequest, name: str, container: str | None, progress: Progress
) -> tuple[JSON, JSON, bool]:
    """Read the original and record the swap on it; returns (original, proxy body, adopted).

    The annotations are written with the resourceVersion the replica count was read from.
    """
    ns = req.namespace
    described = describe("deployments", name, ns)

    async def record() -> tuple[JSON, JSON, bool]:
        original = await cluster.request(
            "GET", path("deployments", ns, name), what=f"read {described}"
        )
        meta = original["metadata"]
        annotations = meta.get("annotations") or {}
        if ours(original, owner=None, project=None):
            raise errors.ClusterError(
                f"{described} is a proxy created by tpconf; it cannot be swapped",
                hint="swap the workload's own Deployment instead",
            )
        # Validate the template (container choice) before touching anything.
        body = M.swap_deployment(req, original, container)
        adopted = L.SWAPPED_BY in annotations
        if adopted:
            if not L.is_our_swap(annotations, owner=req.owner, project=req.project):
                raise _swap_refusal(name, ns, annotations)
            replicas = int(annotations.get(L.ORIGINAL_REPLICAS, "1"))
            progress(
                f"adopting {described}: left swapped by an earlier session of this project "
                f"(original replicas {replicas})"
            )
            record = {L.SWAP_SESSION: req.session_id}
        else:
            replicas = original["spec"].get("replicas", 1)
            progress(f"recording the swap on {described} (replicas {replicas})")
            record = L.swap_annotations(
                owner=req.owner,
                project=req.project,
                original_replicas=replicas,
                session_id=req.session_id,
                proxy=M.swap_proxy_name(name),
            )
        await cluster.request(
            "PATCH",
            path("deployments", ns, name),
            what=f"annotate {described}",
            body={"metadata": {"resourceVersion": meta["resourceVersion"], "annotations": record}},
            content_type=MERGE_PATCH,
        )
        return original, body, adopted

    return await retry_conflicts(
        record,
        gave_up=f"{described} kept changing while it was being swapped",
        hint="run `tpconf up` again",
    )


async def swap(cluster: Cluster, req: ProxyRequest, *, progress: Progress = quiet) -> Proxy:
    """Replace Deployment ``req.operation.deployment``'s pods by the agent (see module doc)."""
    op = req.operation
    assert isinstance(op, Swap)
    ns, name = req.namespace, op.deployment
    described = describe("deployments", name, ns)
    proxy_name = M.swap_proxy_name(name)
    original, body, adopted = await _record_swap(cluster, req, name, op.container, progress)
    try:
        progress(f"creating proxy {describe('deployments', proxy_name, ns)}")
        deployment = await apply(cluster, "deployments", body, req)
        secret = M.keys_secret(req, name=M.keys_secret_name(name), owner=deployment)
        await apply(cluster, "secrets", secret, req, sensitive=True)
        progress(f"scaling {described} to 0")
        await cluster.request(
            "PATCH",
            path("deployments", ns, name, "scale"),
            what=f"scale {described} to 0",
            body={"spec": {"replicas": 0}},
            content_type=MERGE_PATCH,
        )
    except BaseException:
        if not adopted:
            with anyio.CancelScope(shield=True), anyio.move_on_after(UNDO_TIMEOUT):
                await restore(cluster, ns, name, owner=req.owner, project=req.project)
        raise
    containers = original["spec"]["template"]["spec"]["containers"]
    container = str(
        containers[M.choose_container(containers, op.container, what=described)]["name"]
    )
    return Proxy(
        namespace=ns,
        deployment=proxy_name,
        selector=M.agent_selector(req, proxy_name),
        container=container,
        ports=M.container_ports(original, container),
        swapped=name,
    )


async def restore(
    cluster: Cluster,
    namespace: str,
    deployment: str,
    *,
    owner: str | None = None,
    project: str | None = None,
    progress: Progress = quiet,
) -> list[str]:
    """Undo a swap: replicas back to the recorded count, annotations off, proxy deleted.

    With ``owner`` and ``project``, a swap by someone else is refused (AlreadySwapped). Without
    them (``tpconf down --all``), any tpconf swap is restored. Idempotent. Returns what it did;
    the proxy's line starts with ``proxy``.
    """
    done: list[str] = []
    described = describe("deployments", deployment, namespace)
    original = await get(cluster, "deployments", namespace, deployment)
    proxy_name = M.swap_proxy_name(deployment)
    if original is not None:
        annotations = original["metadata"].get("annotations") or {}
        if L.SWAPPED_BY in annotations:
            mine = L.is_our_swap(annotations, owner=owner or "", project=project or "")
            if owner is not None and project is not None and not mine:
                raise _swap_refusal(deployment, namespace, annotations)
            replicas = int(annotations.get(L.ORIGINAL_REPLICAS, "1"))
            proxy_name = annotations.get(L.PROXY_DEPLOYMENT, proxy_name)
            progress(f"restoring {described} to {replicas} replicas")
            await cluster.request(
                "PATCH",
                path("deployments", namespace, deployment),
                what=f"restore {described}",
                body={
                    "metadata": {"annotations": dict.fromkeys(L.SWAP_ANNOTATIONS)},
                    "spec": {"replicas": replicas},
                },
                content_type=MERGE_PATCH,
            )
            done.append(f"{described} (replicas {replicas})")
    proxy = await get(cluster, "deployments", namespace, proxy_name)
    if ours(proxy, owner=owner, project=project):
        proxy_described = describe("deployments", proxy_name, namespace)
        progress(f"deleting proxy {proxy_described}")
        if await delete(cluster, "deployments", namespace, proxy_name):
            done.append(f"proxy {proxy_described}")
        await delete(cluster, "secrets", namespace, M.keys_secret_name(deployment))
    return done
