"""The ``new`` and ``existing`` operations: the agent runs in a Deployment that tpconf creates
(``new``), or in one the user runs already (``existing``).

``new``: the proxy Deployment is created first, then the keys Secret with an ``ownerReference``
to it (its uid exists only once it is created), so the garbage collector deletes the Secret with
the Deployment. The pod cannot start before the Secret exists; the kubelet retries the mount,
and the Secret is there milliseconds later, normally before the pod is even scheduled. A crash
in between leaves a labelled Deployment that ``down`` removes. The Service of ``new`` is owned
by its Deployment the same way.

``existing``: the user's Deployment mounts Secret ``<deployment>-tpconf-keys``, so that Secret
outlives ``tpconf up``: without it the Deployment's next pod could not start. ``up`` *claims* it
(writes this session's keys and its owner annotations), the end of ``up`` and ``tpconf down``
*release* it (remove the owner annotations, keep the keys). The keys left behind are harmless:
the client's private key only ever lives in the memory of the ``tpconf up`` that made it.
"""

from __future__ import annotations

import dataclasses

from tpconf import errors
from tpconf.cluster import labels as L
from tpconf.cluster import manifests as M
from tpconf.cluster.client import Cluster, path
from tpconf.cluster.errors import Conflict
from tpconf.cluster.model import Existing, New, Proxy, ProxyRequest
from tpconf.cluster.objects import (
    JSON,
    Progress,
    apply,
    check_ours,
    delete,
    delete_ours,
    describe,
    get,
    ours,
    quiet,
)


async def new(cluster: Cluster, req: ProxyRequest, *, progress: Progress = quiet) -> Proxy:
    """Create (or re-create, if it is ours) Deployment and Service ``req.name`` running the agent."""
    ns, name = req.namespace, req.name
    progress(f"creating {describe('deployments', name, ns)}")
    deployment = await apply(cluster, "deployments", M.new_deployment(req), req)
    secret = M.keys_secret(req, name=M.keys_secret_name(name), owner=deployment)
    await apply(cluster, "secrets", secret, req, sensitive=True)
    service = M.new_service(req)
    if service is not None:
        service["metadata"]["ownerReferences"] = [M.owner_reference(deployment)]
        progress(f"creating {describe('services', name, ns)}")
        await apply(cluster, "services", service, req)
    else:
        stale = await get(cluster, "services", ns, name)
        if stale is not None:
            check_ours(stale, req, "services")
            await delete(cluster, "services", ns, name)
    return Proxy(
        namespace=ns,
        deployment=name,
        selector=M.agent_selector(req, name),
        container=M.AGENT_CONTAINER,
        ports=tuple(req.expose_remote_ports),
        service=name if service is not None else None,
    )


async def update_service_ports(cluster: Cluster, req: ProxyRequest, ports: tuple[int, ...]) -> None:
    """Make Service ``req.name`` expose exactly ``ports`` (create, patch, or delete it).

    Only the ``new`` operation owns a Service; a swapped Deployment keeps its own Services, which
    select the proxy pod already.
    """
    if not isinstance(req.operation, New):
        return
    wanted = dataclasses.replace(req, expose_remote_ports=ports)
    body = M.new_service(wanted)
    if body is None:
        await delete(cluster, "services", req.namespace, req.name)
    else:
        await apply(cluster, "services", body, wanted)


async def stop_new(cluster: Cluster, req: ProxyRequest, *, progress: Progress = quiet) -> list[str]:
    """Delete what :func:`new` created, if it is still ours; returns what was deleted."""
    done: list[str] = []
    for kind, name in (
        ("deployments", req.name),
        ("services", req.name),
        ("secrets", M.keys_secret_name(req.name)),
    ):
        deleted = await delete_ours(cluster, kind, req.namespace, name, req, progress)
        if deleted is not None:
            done.append(deleted)
    return done


async def existing(cluster: Cluster, req: ProxyRequest, *, progress: Progress = quiet) -> Proxy:
    """Use a Deployment that already runs the agent; deliver fresh keys through its Secret.

    The Deployment must mount Secret ``<name>-tpconf-keys`` at /etc/tpconf/keys with mode 0440
    (docs/agent.md). tpconf claims that Secret (created if missing) with this session's keys
    and, when they changed, deletes the current pods so that the ReplicaSet starts ones that
    read the new keys (the agent reads them at start).
    """
    op = req.operation
    assert isinstance(op, Existing)
    ns, name = req.namespace, op.deployment
    described = describe("deployments", name, ns)
    deployment = await cluster.request(
        "GET", path("deployments", ns, name), what=f"read {described}"
    )
    container = M.check_existing(deployment, req.agent_image)
    match = (deployment["spec"].get("selector") or {}).get("matchLabels") or {}
    if not match:
        raise errors.ClusterError(
            f"{described} has no selector.matchLabels; tpconf finds its pods by them",
            hint="give the Deployment a selector with matchLabels",
        )
    secret_name = M.keys_secret_name(name)
    current = await get(cluster, "secrets", ns, secret_name)
    if current is not None:
        check_ours(current, req, "secrets")
    new_keys = current is None or M.decoded(current) != M.secret_data(req.keys)
    if new_keys or not ours(current, owner=req.owner, project=req.project):
        progress(f"writing this session's keys into {describe('secrets', secret_name, ns)}")
        body = M.existing_keys_secret(req, name)
        await apply(cluster, "secrets", body, req, sensitive=True)
    selector = L.selector_string(match)
    if new_keys:
        pods = await cluster.request(
            "GET",
            path("pods", ns),
            what=f"list the pods of {described}",
            query={"labelSelector": selector},
        )
        for pod in pods.get("items") or []:
            pod_name = pod["metadata"]["name"]
            if not pod["metadata"].get("deletionTimestamp"):
                progress(f"restarting pod {pod_name} so that it reads the new keys")
                await delete(cluster, "pods", ns, pod_name)
    return Proxy(
        namespace=ns,
        deployment=name,
        selector=selector,
        container=container,
        ports=M.container_ports(deployment, container),
    )


async def release(cluster: Cluster, secret: JSON, *, progress: Progress = quiet) -> str | None:
    """Release the keys Secret of an ``existing`` Deployment: remove its owner annotations, keep
    everything else (the Deployment's pods need it to start). What was released, or ``None``
    if it changed meanwhile (claimed again: it is in use)."""
    meta = secret["metadata"]
    described = describe("secrets", meta["name"], meta["namespace"])
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k not in (L.OWNER, L.PROJECT)
    }
    progress(f"releasing {described} (the keys stay: the Deployment mounts them)")
    try:
        # Secrets get no status updates: a conflict means a new claim, which wins.
        await cluster.request(
            "PUT",
            path("secrets", meta["namespace"], meta["name"]),
            what=f"release {described}",
            body={**secret, "metadata": {**meta, "annotations": annotations}},
            sensitive=True,
        )
    except Conflict:
        return None
    return described


async def stop_existing(
    cluster: Cluster, req: ProxyRequest, *, progress: Progress = quiet
) -> list[str]:
    """Release the Secret :func:`existing` claimed, if it still holds this request's keys."""
    op = req.operation
    assert isinstance(op, Existing)
    secret = await get(cluster, "secrets", req.namespace, M.keys_secret_name(op.deployment))
    if secret is None or not ours(secret, owner=req.owner, project=req.project):
        return []
    if M.decoded(secret) != M.secret_data(req.keys):
        return []  # a later start of this project claimed it with its own keys: still in use
    done = await release(cluster, secret, progress=progress)
    return [] if done is None else [done]
