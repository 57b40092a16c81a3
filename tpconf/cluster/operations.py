"""The deployment operations: ``new``, ``swap`` (and ``restore``), ``existing``, ``down``.

Crash safety (DESIGN.md section 3, v1 issues #260, #1026, #1362):

- ``swap`` records who swapped and the original replica count in annotations on the original
  Deployment *before* changing anything (one PATCH, conditional on the resourceVersion it read
  the replicas from), then creates the proxy, then scales the original to 0. Whatever step a
  ``kill -9`` interrupts, :func:`down` finds the annotations and puts back exactly those replicas.
- A Deployment already swapped by someone else is refused (:class:`~tpconf.errors.AlreadySwapped`).
  One swapped by this owner and project (a crashed earlier ``tpconf up``) is *adopted*: the
  recorded replica count is kept (the live one is 0 by then), the proxy is re-created for the new
  session, so the next ``up`` simply carries on and ``down`` restores the right count.
- ``restore`` is one PATCH too: replicas back and our annotations removed together.

Ownership of the keys Secret: the proxy Deployment is created first, then the Secret with an
``ownerReference`` to it (its uid exists only once it is created), so the garbage collector
deletes the Secret with the Deployment. The pod cannot start before the Secret exists; the
kubelet retries the mount, and the Secret is there milliseconds later, normally before the pod
is even scheduled. A crash in between leaves a labelled Deployment that :func:`down` removes.
The Service of ``new`` is owned by its Deployment the same way.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from tpconf import errors
from tpconf.cluster import labels as L
from tpconf.cluster import manifests as M
from tpconf.cluster.client import MERGE_PATCH, Cluster, path
from tpconf.cluster.errors import RBAC_HINT, Conflict
from tpconf.cluster.model import DownReport, Existing, New, Proxy, ProxyRequest, Swap

JSON = dict[str, Any]
Progress = Callable[[str], None]

_KINDS = {"deployments": "Deployment", "services": "Service", "secrets": "Secret"}


def _quiet(_text: str) -> None:
    pass


def _describe(kind: str, name: str, namespace: str) -> str:
    return f'{_KINDS.get(kind, kind)} "{name}" in namespace "{namespace}"'


async def _get(cluster: Cluster, kind: str, namespace: str, name: str) -> JSON | None:
    try:
        return await cluster.request(
            "GET", path(kind, namespace, name), what=f"read {_describe(kind, name, namespace)}"
        )
    except errors.NotFound:
        return None


async def _delete(cluster: Cluster, kind: str, namespace: str, name: str) -> bool:
    """Delete one object (dependents in the background); ``False`` if it was already gone."""
    try:
        await cluster.request(
            "DELETE",
            path(kind, namespace, name),
            what=f"delete {_describe(kind, name, namespace)}",
            body={"propagationPolicy": "Background"},
        )
    except errors.NotFound:
        return False
    return True


def _check_ours(current: Mapping[str, Any], req: ProxyRequest, kind: str) -> None:
    meta = current.get("metadata") or {}
    name = meta.get("name")
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if labels.get(L.MANAGED_BY) != L.MANAGED_BY_VALUE:
        raise errors.ClusterError(
            f"{_describe(kind, str(name), req.namespace)} already exists and was not created "
            "by tpconf",
            hint="choose another name for this deployment in telepresence.yaml, or use "
            "`operation: swap` / `operation: existing` for it",
        )
    if not L.is_ours(annotations, owner=req.owner, project=req.project):
        owner = annotations.get(L.OWNER, "someone else")
        raise errors.ClusterError(
            f"{_describe(kind, str(name), req.namespace)} is in use by tpconf of {owner} "
            "(another user or project)",
            hint=f"run `tpconf down` as {owner} in that project, or choose another name",
        )


async def _apply(
    cluster: Cluster, kind: str, body: JSON, req: ProxyRequest, *, sensitive: bool = False
) -> JSON:
    """Create ``body``; if an object of ours with that name exists, replace it instead."""
    ns = body["metadata"]["namespace"]
    name = body["metadata"]["name"]
    described = _describe(kind, name, ns)
    try:
        return await cluster.request(
            "POST", path(kind, ns), what=f"create {described}", body=body, sensitive=sensitive
        )
    except Conflict as exc:
        if exc.reason != "AlreadyExists":
            raise
    current = await cluster.request("GET", path(kind, ns, name), what=f"read {described}")
    _check_ours(current, req, kind)
    if kind == "services":
        # A merge patch keeps the allocated clusterIP; lists (ports) are replaced whole.
        patch = {"metadata": body["metadata"], "spec": body["spec"]}
        return await cluster.request(
            "PATCH",
            path(kind, ns, name),
            what=f"update {described}",
            body=patch,
            content_type=MERGE_PATCH,
        )
    for attempt in range(5):
        replacement = {
            **body,
            "metadata": {
                **body["metadata"],
                "resourceVersion": current["metadata"]["resourceVersion"],
            },
        }
        try:
            return await cluster.request(
                "PUT",
                path(kind, ns, name),
                what=f"replace {described}",
                body=replacement,
                sensitive=sensitive,
            )
        except Conflict:
            # A controller updated its status meanwhile: read the new version and retry.
            await anyio.sleep(0.1 * (attempt + 1))
            current = await cluster.request("GET", path(kind, ns, name), what=f"read {described}")
            _check_ours(current, req, kind)
    raise errors.ClusterError(f"{described} kept changing while tpconf replaced it")


def _selector(labels: Mapping[str, str]) -> str:
    return L.selector_string(labels)


async def new(cluster: Cluster, req: ProxyRequest, *, progress: Progress = _quiet) -> Proxy:
    """Create (or re-create, if it is ours) Deployment and Service ``req.name`` running the agent."""
    ns, name = req.namespace, req.name
    progress(f"creating {_describe('deployments', name, ns)}")
    deployment = await _apply(cluster, "deployments", M.new_deployment(req), req)
    secret = M.keys_secret(req, name=M.keys_secret_name(name), owner=deployment)
    await _apply(cluster, "secrets", secret, req, sensitive=True)
    service = M.new_service(req)
    if service is not None:
        service["metadata"]["ownerReferences"] = [M.owner_reference(deployment)]
        progress(f"creating {_describe('services', name, ns)}")
        await _apply(cluster, "services", service, req)
    else:
        stale = await _get(cluster, "services", ns, name)
        if stale is not None:
            _check_ours(stale, req, "services")
            await _delete(cluster, "services", ns, name)
    return Proxy(
        namespace=ns,
        deployment=name,
        selector=_selector(
            {
                L.PROXY: L.label_value(name),
                L.SESSION: L.label_value(req.session_id),
                L.START: L.label_value(req.start_id),
            }
        ),
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
        await _delete(cluster, "services", req.namespace, req.name)
    else:
        await _apply(cluster, "services", body, wanted)


def _swap_refusal(
    name: str, namespace: str, annotations: Mapping[str, str]
) -> errors.AlreadySwapped:
    who = annotations.get(L.SWAPPED_BY, "someone")
    proxy = annotations.get(L.PROXY_DEPLOYMENT, M.swap_proxy_name(name))
    return errors.AlreadySwapped(
        f'Deployment "{name}" in namespace "{namespace}" is already swapped by {who} '
        f"(proxy Deployment {proxy!r}, original replicas "
        f"{annotations.get(L.ORIGINAL_REPLICAS, '?')})",
        hint=f"{who} restores it with `tpconf down` in their project; anyone with access can "
        f"run `tpconf down --all -n {namespace}` (restores every swap in the namespace)",
    )


async def _record_swap(
    cluster: Cluster, req: ProxyRequest, name: str, container: str | None, progress: Progress
) -> tuple[JSON, JSON, bool]:
    """Read the original and record the swap on it; returns (original, proxy body, adopted).

    The annotations are written with the resourceVersion the replica count was read from; the
    controllers' own status updates conflict with that now and then, so read again and retry.
    """
    ns = req.namespace
    described = _describe("deployments", name, ns)
    proxy_name = M.swap_proxy_name(name)
    for attempt in range(5):
        original = await cluster.request(
            "GET", path("deployments", ns, name), what=f"read {described}"
        )
        meta = original["metadata"]
        annotations = meta.get("annotations") or {}
        if (meta.get("labels") or {}).get(L.MANAGED_BY) == L.MANAGED_BY_VALUE:
            raise errors.ClusterError(
                f"{described} is a proxy created by tpconf; it cannot be swapped",
                hint="swap the workload's own Deployment instead",
            )
        # Validate the template (container choice) before touching anything.
        body = M.swap_deployment(req, original, container)
        if L.SWAPPED_BY in annotations:
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
                proxy=proxy_name,
            )
        try:
            await cluster.request(
                "PATCH",
                path("deployments", ns, name),
                what=f"annotate {described}",
                body={
                    "metadata": {"resourceVersion": meta["resourceVersion"], "annotations": record}
                },
                content_type=MERGE_PATCH,
            )
        except Conflict:
            await anyio.sleep(0.1 * (attempt + 1))
            continue
        return original, body, L.SWAPPED_BY in annotations
    raise errors.ClusterError(
        f"{described} kept changing while it was being swapped", hint="run `tpconf up` again"
    )


async def swap(cluster: Cluster, req: ProxyRequest, *, progress: Progress = _quiet) -> Proxy:
    """Replace Deployment ``req.operation.deployment``'s pods by the agent (see module doc)."""
    op = req.operation
    assert isinstance(op, Swap)
    ns, name = req.namespace, op.deployment
    described = _describe("deployments", name, ns)
    proxy_name = M.swap_proxy_name(name)
    original, body, adopted = await _record_swap(cluster, req, name, op.container, progress)
    try:
        progress(f"creating proxy {_describe('deployments', proxy_name, ns)}")
        deployment = await _apply(cluster, "deployments", body, req)
        secret = M.keys_secret(req, name=M.keys_secret_name(name), owner=deployment)
        await _apply(cluster, "secrets", secret, req, sensitive=True)
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
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await restore(cluster, ns, name, owner=req.owner, project=req.project)
        raise
    container = body["spec"]["template"]["spec"]["containers"][
        M.choose_container(
            original["spec"]["template"]["spec"]["containers"], op.container, what=described
        )
    ]["name"]
    return Proxy(
        namespace=ns,
        deployment=proxy_name,
        selector=_selector(
            {
                L.PROXY: L.label_value(proxy_name),
                L.SESSION: L.label_value(req.session_id),
                L.START: L.label_value(req.start_id),
            }
        ),
        container=str(container),
        ports=M.container_ports(original, str(container)),
        swapped=name,
    )


async def restore(
    cluster: Cluster,
    namespace: str,
    deployment: str,
    *,
    owner: str | None = None,
    project: str | None = None,
    progress: Progress = _quiet,
) -> list[str]:
    """Undo a swap: replicas back to the recorded count, annotations off, proxy deleted.

    With ``owner`` and ``project``, a swap by someone else is refused (AlreadySwapped). Without
    them (``tpconf down --all``), any tpconf swap is restored. Idempotent. Returns what it did.
    """
    done: list[str] = []
    described = _describe("deployments", deployment, namespace)
    original = await _get(cluster, "deployments", namespace, deployment)
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
    proxy = await _get(cluster, "deployments", namespace, proxy_name)
    proxy_meta = (proxy or {}).get("metadata") or {}
    deletable = (proxy_meta.get("labels") or {}).get(L.MANAGED_BY) == L.MANAGED_BY_VALUE and (
        owner is None
        or project is None
        or L.is_ours(proxy_meta.get("annotations"), owner=owner, project=project)
    )
    if proxy is not None and deletable:
        progress(f"deleting proxy {_describe('deployments', proxy_name, namespace)}")
        if await _delete(cluster, "deployments", namespace, proxy_name):
            done.append(f"proxy {_describe('deployments', proxy_name, namespace)}")
        await _delete(cluster, "secrets", namespace, M.keys_secret_name(deployment))
    return done


def _decoded(secret: Mapping[str, Any]) -> dict[str, str]:
    return {
        k: base64.b64decode(v).decode("utf-8", "replace")
        for k, v in (secret.get("data") or {}).items()
    }


async def existing(cluster: Cluster, req: ProxyRequest, *, progress: Progress = _quiet) -> Proxy:
    """Use a Deployment that already runs the agent; deliver fresh keys through its Secret.

    The Deployment must mount Secret ``<name>-tpconf-keys`` at /etc/tpconf/keys
    (docs/agent.md). tpconf writes this session's keys into it (created if missing, labelled,
    not owned: the Deployment is the user's) and, when they changed, deletes the current pods so
    that the ReplicaSet starts ones that read the new keys (the agent reads them at start).
    """
    op = req.operation
    assert isinstance(op, Existing)
    ns, name = req.namespace, op.deployment
    described = _describe("deployments", name, ns)
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
    current = await _get(cluster, "secrets", ns, secret_name)
    changed = True
    if current is None:
        progress(f"creating {_describe('secrets', secret_name, ns)}")
        await cluster.request(
            "POST",
            path("secrets", ns),
            what=f"create {_describe('secrets', secret_name, ns)}",
            body=body,
            sensitive=True,
        )
    else:
        annotations = current["metadata"].get("annotations") or {}
        if L.OWNER in annotations and not L.is_ours(
            annotations, owner=req.owner, project=req.project
        ):
            raise errors.ClusterError(
                f"{described} is in use by tpconf of {annotations[L.OWNER]}",
                hint=f"run `tpconf down` as {annotations[L.OWNER]} in that project first",
            )
        changed = _decoded(current) != M.secret_data(req.keys)
        if changed:
            progress(f"writing new keys into {_describe('secrets', secret_name, ns)}")
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await cluster.request(
                "PUT",
                path("secrets", ns, secret_name),
                what=f"update {_describe('secrets', secret_name, ns)}",
                body=body,
                sensitive=True,
            )
    selector = _selector(match)
    if changed:
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
                await _delete(cluster, "pods", ns, pod_name)
    return Proxy(
        namespace=ns,
        deployment=name,
        selector=selector,
        container=container,
        ports=M.container_ports(deployment, container),
    )


async def start(cluster: Cluster, req: ProxyRequest, *, progress: Progress = _quiet) -> Proxy:
    """Run the request's operation (``new``, ``swap`` or ``existing``)."""
    if isinstance(req.operation, New):
        return await new(cluster, req, progress=progress)
    if isinstance(req.operation, Swap):
        return await swap(cluster, req, progress=progress)
    return await existing(cluster, req, progress=progress)


async def stop(cluster: Cluster, req: ProxyRequest, *, progress: Progress = _quiet) -> list[str]:
    """Undo :func:`start` for one request (the reconciler's stop). Idempotent."""
    ns = req.namespace
    done: list[str] = []
    op = req.operation
    if isinstance(op, Swap):
        return await restore(
            cluster, ns, op.deployment, owner=req.owner, project=req.project, progress=progress
        )
    names = (
        [
            ("deployments", req.name),
            ("services", req.name),
            ("secrets", M.keys_secret_name(req.name)),
        ]
        if isinstance(op, New)
        else [("secrets", M.keys_secret_name(op.deployment))]
    )
    for kind, name in names:
        current = await _get(cluster, kind, ns, name)
        if current is None:
            continue
        meta = current["metadata"]
        if (meta.get("labels") or {}).get(L.MANAGED_BY) != L.MANAGED_BY_VALUE:
            continue
        if not L.is_ours(meta.get("annotations"), owner=req.owner, project=req.project):
            continue
        progress(f"deleting {_describe(kind, name, ns)}")
        if await _delete(cluster, kind, ns, name):
            done.append(_describe(kind, name, ns))
    return done


@dataclass(frozen=True)
class Leftovers:
    """What this owner and project (or, with ``all``, anyone) has in the cluster right now."""

    swapped: tuple[tuple[str, str], ...] = ()
    """(namespace, Deployment) pairs that are swapped."""
    objects: tuple[tuple[str, str, str], ...] = ()
    """(kind, namespace, name) of the Deployments, Services and Secrets tpconf created."""

    def lines(self) -> list[str]:
        """Human-readable lines, for `tpconf status`."""
        return [f"swapped {_describe('deployments', name, ns)}" for ns, name in self.swapped] + [
            _describe(kind, name, ns) for kind, ns, name in self.objects
        ]


async def leftovers(
    cluster: Cluster, namespaces: Iterable[str], *, owner: str, project: str, all: bool = False
) -> Leftovers:
    """Find, without changing anything, what :func:`down` would restore and delete."""
    swapped: list[tuple[str, str]] = []
    objects: list[tuple[str, str, str]] = []
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
        for kind in ("deployments", "services", "secrets"):
            listing = await cluster.request(
                "GET",
                path(kind, ns),
                what=f'list the {_KINDS[kind]}s of tpconf in namespace "{ns}"',
                query={"labelSelector": L.MANAGED_SELECTOR},
            )
            for item in listing.get("items") or []:
                meta = item["metadata"]
                if not all and not L.is_ours(meta.get("annotations"), owner=owner, project=project):
                    continue
                if not meta.get("deletionTimestamp"):
                    objects.append((kind, ns, meta["name"]))
    return Leftovers(tuple(swapped), tuple(objects))


async def down(
    cluster: Cluster,
    namespaces: Iterable[str],
    *,
    owner: str,
    project: str,
    all: bool = False,
    progress: Progress = _quiet,
) -> DownReport:
    """Restore the swaps and delete the objects this owner and project left behind.

    Works from what is in the cluster only (labels and annotations), so it also cleans up after
    a ``kill -9`` of ``tpconf up``. With ``all``, every tpconf object in the namespaces,
    whoever created it. Idempotent: a second run reports nothing.
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
        progress(f"deleting {_describe(kind, name, ns)}")
        if await _delete(cluster, kind, ns, name):
            report.deleted.append(_describe(kind, name, ns))
    return report


#: (verb, API group, resource) that each operation needs; ``None`` key: every operation.
ACCESS: dict[type | None, tuple[tuple[str, str, str], ...]] = {
    None: (
        ("get", "apps", "deployments"),
        ("list", "apps", "deployments"),
        ("get", "", "pods"),
        ("list", "", "pods"),
        ("watch", "", "pods"),
        ("create", "", "pods/portforward"),
        ("get", "", "pods/portforward"),
        ("get", "", "pods/log"),
        ("list", "", "events"),
        ("get", "", "secrets"),
        ("create", "", "secrets"),
        ("update", "", "secrets"),
        ("delete", "", "secrets"),
        ("list", "", "secrets"),
    ),
    New: (
        ("create", "apps", "deployments"),
        ("update", "apps", "deployments"),
        ("delete", "apps", "deployments"),
        ("get", "", "services"),
        ("create", "", "services"),
        ("patch", "", "services"),
        ("delete", "", "services"),
    ),
    Swap: (
        ("create", "apps", "deployments"),
        ("update", "apps", "deployments"),
        ("patch", "apps", "deployments"),
        ("delete", "apps", "deployments"),
        ("patch", "apps", "deployments/scale"),
    ),
    Existing: (("delete", "", "pods"),),
}


def required_access(operations: Iterable[type]) -> list[tuple[str, str, str]]:
    """The (verb, group, resource) triples the given operation types need, without repeats."""
    needed: dict[tuple[str, str, str], None] = dict.fromkeys(ACCESS[None])
    for op in operations:
        needed.update(dict.fromkeys(ACCESS.get(op, ())))
    return list(needed)


def _qualified(group: str, resource: str) -> str:
    if not group:
        return resource
    base, _, sub = resource.partition("/")
    return f"{base}.{group}" + (f"/{sub}" if sub else "")


async def preflight(
    cluster: Cluster, namespace: str, operations: Iterable[type] = (New, Swap, Existing)
) -> None:
    """Check with SelfSubjectAccessReviews that tpconf may do what ``operations`` need.

    Raises :class:`~tpconf.errors.Forbidden` naming every missing ``verb resource`` (e.g.
    ``create pods/portforward``) before anything is created, instead of failing half-way.
    """
    needed = required_access(operations)
    denied: list[str] = []

    async def check(verb: str, group: str, resource: str) -> None:
        base, _, sub = resource.partition("/")
        attrs = {"namespace": namespace, "verb": verb, "group": group, "resource": base}
        if sub:
            attrs["subresource"] = sub
        review = await cluster.request(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            what=f"check access to {verb} {_qualified(group, resource)}",
            body={
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": attrs},
            },
        )
        if not (review.get("status") or {}).get("allowed"):
            denied.append(f"{verb} {_qualified(group, resource)}")

    async with anyio.create_task_group() as tg:
        for verb, group, resource in needed:
            tg.start_soon(check, verb, group, resource)
    if denied:
        order = {f"{v} {_qualified(g, r)}": i for i, (v, g, r) in enumerate(needed)}
        denied.sort(key=order.__getitem__)
        raise errors.Forbidden(
            f'missing permissions in namespace "{namespace}": {", ".join(denied)}',
            hint=RBAC_HINT.format(namespace=namespace),
        )
