"""The ``new`` and ``existing`` operations: the agent runs in a Deployment that tpconf creates
(``new``), or in one the user runs already (``existing``).

``new``: the proxy Deployment is created first, then the keys Secret with an ``ownerReference``
to it (its uid exists only once it is created), so the garbage collector deletes the Secret with
the Deployment. The pod cannot start before the Secret exists; the kubelet retries the mount,
and the Secret is there milliseconds later, normally before the pod is even scheduled. A crash
in between leaves a labelled Deployment that ``down`` removes. The Service of ``new`` is owned
by its Deployment the same way.

``existing``: tpconf writes this session's keys into the Secret the user's Deployment mounts
(created if missing, labelled, not owned: the Deployment is the user's).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from typing import Any

from tpconf import errors
from tpconf.cluster import labels as L
from tpconf.cluster import manifests as M
from tpconf.cluster.client import Cluster, path
from tpconf.cluster.model import Existing, New, Proxy, ProxyRequest
from tpconf.cluster.objects import (
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


def _decoded(secret: Mapping[str, Any]) -> dict[str, str]:
    return {
        k: base64.b64decode(v).decode("utf-8", "replace")
        for k, v in (secret.get("data") or {}).items()
    }


async def existing(cluster: Cluster, req: ProxyRequest, *, progress: Progress = quiet) -> Proxy:
    """Use a Deployment that already runs the agent; deliver fresh keys through its Secret.

    The Deployment must mount Secret ``<name>-tpconf-keys`` at /etc/tpconf/keys with mode 0440
    (docs/agent.md). tpconf writes this session's keys into it (created if missing) and, when
    they changed, deletes the current pods so that the ReplicaSet starts ones that
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
    body = M.keys_secret(req, name=secret_name)
    current = await get(cluster, "secrets", ns, secret_name)
    new_keys = True
    if current is None:
        progress(f"creating {describe('secrets', secret_name, ns)}")
        await cluster.request(
            "POST",
            path("secrets", ns),
            what=f"create {describe('secrets', secret_name, ns)}",
            body=body,
            sensitive=True,
        )
    else:
        if ours(current, owner=None, project=None):
            check_ours(current, req, "secrets")  # another user's or project's: refused
        new_keys = _decoded(current) != M.secret_data(req.keys)
        if new_keys:
            progress(f"writing new keys into {describe('secrets', secret_name, ns)}")
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await cluster.request(
                "PUT",
                path("secrets", ns, secret_name),
                what=f"update {describe('secrets', secret_name, ns)}",
                body=body,
                sensitive=True,
            )
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


async def stop_existing(
    cluster: Cluster, req: ProxyRequest, *, progress: Progress = quiet
) -> list[str]:
    """Delete the Secret :func:`existing` wrote, if it is ours."""
    op = req.operation
    assert isinstance(op, Existing)
    secret = M.keys_secret_name(op.deployment)
    deleted = await delete_ours(cluster, "secrets", req.namespace, secret, req, progress)
    return [] if deleted is None else [deleted]
