"""The ``intercept`` operation: the agent joins a Deployment's pods as a sidecar; the app keeps
serving, and developers receive its traffic (all of it, or the requests their headers select)
without taking the service away from the team.

Joining (:func:`intercept`):

1. the agent's keys: one Secret per intercepted Deployment, ``<deployment>-tpconf-intercept``,
   created by the first developer and read by the next (they all log in to the same sidecars);
2. a Lease per developer (owner and project), renewed by ``up`` (:func:`renew`): the list of
   who holds the intercept, which a ``kill -9`` cannot leave behind for long;
3. the pod template: the first developer records the original template in an annotation of the
   Deployment (metadata only: no rollout) and adds the sidecar in the same conditional write;
   later ones only bump an epoch annotation, which fails any leaver's conditional restore that
   read the Deployment before them. Then the rollout is waited for, so that every pod has the
   agent;
4. the Services: each port that targets an intercepted container port is pointed at the
   agent's named port (the original ports recorded on the Service). Only now, since a pod
   without the name would drop out of the endpoints at once.

Leaving (:func:`leave`, and ``tpconf down`` after a crash): the developer's Lease goes; if no
live Lease remains, the Services get their ports back first (every pod still runs the app on
them), then the template is written back exactly as recorded (the Deployment controller then
reuses the original ReplicaSet), in one write conditional on what was read before the Leases
were listed. If the template changed meanwhile (a deploy), only tpconf's pieces are taken out
of it instead. Replicas are never touched.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import uuid
from collections.abc import Collection, Mapping
from typing import Any

import anyio

from tpconf import errors
from tpconf.cluster import labels as L
from tpconf.cluster import manifests as M
from tpconf.cluster import sidecar as S
from tpconf.cluster.client import MERGE_PATCH, Cluster, path
from tpconf.cluster.errors import Conflict
from tpconf.cluster.model import Intercept, Proxy, ProxyRequest
from tpconf.cluster.objects import JSON, Progress, delete, describe, get, quiet, retry_conflicts
from tpconf.cluster.pods import wait_for_pod

ORIGINAL_TEMPLATE = "tpconf.io/intercept-template"
"""On the Deployment: its pod template before the first intercept, as JSON."""
AGENT_PORTS = "tpconf.io/intercept-ports"
"""On the Deployment: the sidecar's ports, ``{"APP": AGENT}``."""
CONTAINER = "tpconf.io/intercept-container"
"""On the Deployment: the container whose ports are intercepted."""
EPOCH = "tpconf.io/intercept-epoch"
"""On the Deployment: changed by every join, so a concurrent restore fails its condition."""
DEPLOYMENT_ANNOTATIONS = (ORIGINAL_TEMPLATE, AGENT_PORTS, CONTAINER, EPOCH)
ORIGINAL_PORTS = "tpconf.io/intercept-original-ports"
"""On a Service: its ports before they were pointed at the sidecar, as JSON."""
INTERCEPTED = "tpconf.io/intercept"
"""On a Service and on the Leases: the intercepted Deployment's name."""

#: A developer's Lease lapses this long after its last renewal (``up`` renews every third).
LEASE_SECONDS = 30
RENEW_SECONDS = LEASE_SECONDS / 3
#: How long joining waits for every pod to run the sidecar.
ROLLOUT_TIMEOUT = 300.0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _micro_time(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_name(deployment: str, owner: str, project: str) -> str:
    """One Lease per developer (owner and project) and intercepted Deployment."""
    digest = hashlib.sha256(f"{owner}\0{project}".encode()).hexdigest()[:10]
    return f"tpconf-{deployment}"[:240] + f"-{digest}"


def live(lease: Mapping[str, Any], now: datetime.datetime | None = None) -> bool:
    """Whether a Lease was renewed within its duration."""
    spec = lease.get("spec") or {}
    renewed = spec.get("renewTime")
    if not renewed:
        return False
    when = datetime.datetime.strptime(renewed[:19], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.UTC
    )
    duration = float(spec.get("leaseDurationSeconds") or LEASE_SECONDS)
    return (now or _now()) - when < datetime.timedelta(seconds=duration)


def _lease(req: ProxyRequest, deployment: str) -> JSON:
    meta = M.object_metadata(req, lease_name(deployment, req.owner, req.project))
    meta["labels"][INTERCEPTED] = L.label_value(deployment)
    now = _micro_time(_now())
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": req.owner,
            "leaseDurationSeconds": LEASE_SECONDS,
            "acquireTime": now,
            "renewTime": now,
        },
    }


async def holders(cluster: Cluster, namespace: str, deployment: str) -> list[JSON]:
    """The live Leases on an intercepted Deployment (expired ones are a crashed ``up``'s)."""
    listing = await cluster.request(
        "GET",
        path("leases", namespace),
        what=f'list the intercept leases in namespace "{namespace}"',
        query={"labelSelector": f"{INTERCEPTED}={L.label_value(deployment)}"},
    )
    return [lease for lease in listing.get("items") or [] if live(lease)]


async def renew(cluster: Cluster, req: ProxyRequest) -> None:
    """Keep this developer's Lease live (re-created if someone's ``down --all`` deleted it)."""
    op = req.operation
    assert isinstance(op, Intercept)
    name = lease_name(op.deployment, req.owner, req.project)
    try:
        await cluster.request(
            "PATCH",
            path("leases", req.namespace, name),
            what=f'renew Lease "{name}"',
            body={"spec": {"renewTime": _micro_time(_now())}},
            content_type=MERGE_PATCH,
        )
    except errors.NotFound:
        await _hold(cluster, req, op.deployment)


async def _hold(cluster: Cluster, req: ProxyRequest, deployment: str) -> None:
    body = _lease(req, deployment)
    name = body["metadata"]["name"]
    try:
        await cluster.request(
            "POST", path("leases", req.namespace), what=f'create Lease "{name}"', body=body
        )
    except Conflict:  # ours from a crashed `up` of this project: take it over
        await cluster.request(
            "PATCH",
            path("leases", req.namespace, name),
            what=f'renew Lease "{name}"',
            body={"spec": body["spec"]},
            content_type=MERGE_PATCH,
        )


async def _shared_keys(cluster: Cluster, req: ProxyRequest, progress: Progress) -> dict[str, str]:
    """The agent's keys every developer of the Deployment uses: from its Secret, or ours."""
    op = req.operation
    assert isinstance(op, Intercept)
    name = S.keys_secret_name(op.deployment)
    described = describe("secrets", name, req.namespace)
    current = await get(cluster, "secrets", req.namespace, name)
    if current is None:
        progress(f"creating {described}")
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": M.object_metadata(req, name),
            "stringData": dict(req.shared_keys),
        }
        body["metadata"]["labels"][INTERCEPTED] = L.label_value(op.deployment)
        try:
            await cluster.request(
                "POST", path("secrets", req.namespace), what=f"create {described}", body=body,
                sensitive=True,
            )  # fmt: skip
            return dict(req.shared_keys)
        except Conflict:  # another developer created it a moment ago
            current = await get(cluster, "secrets", req.namespace, name)
            if current is None:
                raise
    if (current["metadata"].get("labels") or {}).get(L.MANAGED_BY) != L.MANAGED_BY_VALUE:
        raise errors.ClusterError(
            f"{described} exists and was not created by tpconf",
            hint=f"delete it (`kubectl -n {req.namespace} delete secret {name}`): tpconf keeps "
            "the intercept's agent keys there",
        )
    return M.decoded(current)


def _check_interceptable(deployment: Mapping[str, Any], what: str) -> None:
    meta = deployment["metadata"]
    annotations = meta.get("annotations") or {}
    if (meta.get("labels") or {}).get(L.MANAGED_BY) == L.MANAGED_BY_VALUE:
        raise errors.ClusterError(
            f"{what} is a proxy created by tpconf; it cannot be intercepted",
            hint="intercept the workload's own Deployment instead",
        )
    if L.SWAPPED_BY in annotations:
        raise errors.ClusterError(
            f"{what} is swapped by {annotations[L.SWAPPED_BY]}; a swapped Deployment cannot be "
            "intercepted",
            hint="wait until the swap ends (or `tpconf down` where it was made), then intercept",
        )
    strategy = (deployment["spec"].get("strategy") or {}).get("type", "RollingUpdate")
    if strategy == "Recreate":
        raise errors.ClusterError(
            f"{what} uses the Recreate strategy: adding the agent would stop every pod at once",
            hint="use `swap:` for it, or give it a RollingUpdate strategy",
        )
    if not (deployment["spec"].get("selector") or {}).get("matchLabels"):
        raise errors.ClusterError(
            f"{what} has no selector.matchLabels; tpconf finds its pods by them",
            hint="give the Deployment a selector with matchLabels",
        )


async def _install(
    cluster: Cluster, req: ProxyRequest, progress: Progress
) -> tuple[JSON, dict[int, int], str]:
    """Add the sidecar (or join the one there); the Deployment as written, APP -> AGENT ports,
    and the app container's name."""
    op = req.operation
    assert isinstance(op, Intercept)
    ns, name = req.namespace, op.deployment
    what = describe("deployments", name, ns)

    async def attempt() -> tuple[JSON, dict[int, int], str]:
        current = await cluster.request("GET", path("deployments", ns, name), what=f"read {what}")
        _check_interceptable(current, what)
        meta = current["metadata"]
        annotations = dict(meta.get("annotations") or {})
        annotations[EPOCH] = uuid.uuid4().hex[:12]
        if ORIGINAL_TEMPLATE in annotations:
            ports = {int(k): int(v) for k, v in json.loads(annotations[AGENT_PORTS]).items()}
            container = annotations.get(CONTAINER, "")
            if op.container not in (None, container):
                raise errors.ClusterError(
                    f"{what} is intercepted on container {container!r} by someone else",
                    hint=f"intercept container {container!r} too, or wait until they stop",
                )
            missing = sorted(set(op.ports) - set(ports))
            if missing:
                raise errors.ClusterError(
                    f"{what} is intercepted by someone else on port(s) "
                    f"{', '.join(map(str, sorted(ports)))}, not {', '.join(map(str, missing))}",
                    hint="intercept those ports (the pods would have to restart to add one), "
                    "or wait until the others stop",
                )
            progress(f"joining the intercept of {what}")
            body = {"metadata": {"resourceVersion": meta["resourceVersion"], "annotations": {EPOCH: annotations[EPOCH]}}}  # fmt: skip
            written = await cluster.request(
                "PATCH", path("deployments", ns, name), what=f"annotate {what}", body=body,
                content_type=MERGE_PATCH,
            )  # fmt: skip
            return written, ports, container
        template = current["spec"]["template"]
        app = S.app_container(template, op.container, what=what)
        app_ports = S.intercepted_ports(app, op.ports, what=what)
        ports = S.agent_ports(template["spec"], app_ports)
        annotations[ORIGINAL_TEMPLATE] = json.dumps(template, separators=(",", ":"))
        annotations[AGENT_PORTS] = json.dumps({str(a): b for a, b in ports.items()})
        annotations[CONTAINER] = str(app["name"])
        replacement = copy.deepcopy(current)
        replacement["metadata"]["annotations"] = annotations
        replacement["spec"]["template"] = S.intercept_template(
            template,
            deployment=name,
            container=op.container,
            ports=ports,
            image=req.agent_image,
            low_ports=req.expose_remote_ports,
        )
        shown = ", ".join(f"{a} -> {b}" for a, b in ports.items())
        progress(f"adding the agent to the pods of {what} (ports {shown})")
        written = await cluster.request(
            "PUT", path("deployments", ns, name), what=f"add the agent to {what}", body=replacement
        )
        return written, ports, str(app["name"])

    return await retry_conflicts(
        attempt, gave_up=f"{what} kept changing while tpconf added its agent"
    )


def rolled_out(deployment: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether every pod of ``deployment`` runs its current template; and how far it is."""
    spec, status = deployment["spec"], deployment.get("status") or {}
    wanted = int(spec.get("replicas", 1))
    observed = int(status.get("observedGeneration") or 0) >= int(
        deployment["metadata"].get("generation") or 0
    )
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    done = observed and updated == wanted and total == wanted and available >= wanted
    return done, f"{updated}/{wanted} pods updated, {total - updated} old pod(s) left"


async def wait_rolled_out(
    cluster: Cluster, namespace: str, name: str, *, timeout: float, progress: Progress
) -> None:
    """Wait until every pod of Deployment ``name`` runs its current template."""
    what = describe("deployments", name, namespace)
    last = ""
    with anyio.move_on_after(timeout):
        while True:
            deployment = await cluster.request(
                "GET", path("deployments", namespace, name), what=f"read {what}"
            )
            done, text = rolled_out(deployment)
            if done:
                return
            if text != last:
                progress(f"rollout of {what}: {text}")
                last = text
            await anyio.sleep(0.5)
    raise errors.WaitTimeout(
        f"timed out after {timeout:g} s waiting for the rollout of {what} ({last})",
        hint=f"kubectl -n {namespace} rollout status deployment/{name}",
    )


async def _switch_services(
    cluster: Cluster,
    namespace: str,
    name: str,
    template: Mapping[str, Any],
    app: Mapping[str, Any],
    intercepted: list[int],
    progress: Progress,
) -> list[str]:
    """Point every Service port that targets an intercepted port at the sidecar."""
    listing = await cluster.request(
        "GET", path("services", namespace), what=f'list the Services in namespace "{namespace}"'
    )
    labels = S.template_labels(template)
    switched: list[str] = []
    for service in listing.get("items") or []:
        meta, spec = service["metadata"], service.get("spec") or {}
        if not S.selects(spec.get("selector"), labels):
            continue
        what = describe("services", meta["name"], namespace)
        ports = S.switched_ports(spec.get("ports") or [], app, intercepted)
        if ports is None:
            continue
        if S.headless(service):
            progress(f"{what} is headless: its clients reach the pods directly, not the intercept")
            continue
        if ORIGINAL_PORTS in (meta.get("annotations") or {}):
            switched.append(meta["name"])  # another developer did it
            continue
        progress(f"pointing {what} at the agent")
        annotations = {ORIGINAL_PORTS: json.dumps(spec.get("ports") or []), INTERCEPTED: name}
        await cluster.request(
            "PATCH",
            path("services", namespace, meta["name"]),
            what=f"point {what} at the agent",
            body={
                "metadata": {
                    "resourceVersion": meta["resourceVersion"],
                    "annotations": annotations,
                },
                "spec": {"ports": ports},
            },
            content_type=MERGE_PATCH,
        )
        switched.append(meta["name"])
    if not switched:
        progress(
            "no Service sends traffic to the intercepted ports: only clients of the agent's "
            "ports reach this machine"
        )
    return switched


async def intercept(cluster: Cluster, req: ProxyRequest, *, progress: Progress = quiet) -> Proxy:
    """Join (or start) the intercept of ``req.operation.deployment`` (see the module doc)."""
    op = req.operation
    assert isinstance(op, Intercept)
    ns, name = req.namespace, op.deployment
    keys = await _shared_keys(cluster, req, progress)
    await _hold(cluster, req, name)
    try:
        written, ports, container = await _install(cluster, req, progress)
        original = json.loads(written["metadata"]["annotations"][ORIGINAL_TEMPLATE])
        app = S.app_container(original, container, what=describe("deployments", name, ns))
        match_labels = written["spec"]["selector"]["matchLabels"]
        proxy = Proxy(
            namespace=ns,
            deployment=name,
            selector=S.agent_selector(match_labels),
            container=M.AGENT_CONTAINER,
            ports=tuple(ports),
            intercepted=tuple(ports.items()),
            workload=container,
            shared_keys=keys,
        )
        if int(written["spec"].get("replicas", 1)) == 0:
            raise errors.ClusterError(
                f"{describe('deployments', name, ns)} is scaled to 0: there is no pod to intercept",
                hint=f"kubectl -n {ns} scale deployment/{name} --replicas=1",
            )
        await wait_for_pod(cluster, proxy, progress=progress, timeout=ROLLOUT_TIMEOUT)
        await wait_rolled_out(cluster, ns, name, timeout=ROLLOUT_TIMEOUT, progress=progress)
        await _switch_services(cluster, ns, name, original, app, list(ports), progress)
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(60):
            await leave(cluster, req, progress=progress)
        raise
    return proxy


async def leave(cluster: Cluster, req: ProxyRequest, *, progress: Progress = quiet) -> list[str]:
    """This developer stops intercepting; the last one restores the Deployment."""
    op = req.operation
    assert isinstance(op, Intercept)
    name = lease_name(op.deployment, req.owner, req.project)
    await delete(cluster, "leases", req.namespace, name)
    return await restore_unheld(cluster, req.namespace, op.deployment, progress=progress)


def strip_sidecar(template: Mapping[str, Any], deployment: str) -> JSON:
    """``template`` without tpconf's pieces (when it changed during the intercept)."""
    out = copy.deepcopy(dict(template))
    spec = out["spec"]
    spec["containers"] = [c for c in spec["containers"] if c.get("name") != M.AGENT_CONTAINER]
    secret = S.keys_secret_name(deployment)
    spec["volumes"] = [
        v for v in spec.get("volumes") or [] if (v.get("secret") or {}).get("secretName") != secret
    ]
    if not spec["volumes"]:
        del spec["volumes"]
    labels = (out.get("metadata") or {}).get("labels") or {}
    labels.pop(S.AGENT_LABEL, None)
    return out


async def _restore_services(
    cluster: Cluster, namespace: str, name: str, progress: Progress
) -> list[str]:
    listing = await cluster.request(
        "GET",
        path("services", namespace),
        what=f'list the Services in namespace "{namespace}"',
    )
    done: list[str] = []
    for service in listing.get("items") or []:
        meta = service["metadata"]
        annotations = meta.get("annotations") or {}
        if annotations.get(INTERCEPTED) != name or ORIGINAL_PORTS not in annotations:
            continue
        what = describe("services", meta["name"], namespace)
        progress(f"restoring {what}")
        await cluster.request(
            "PATCH",
            path("services", namespace, meta["name"]),
            what=f"restore {what}",
            body={
                "metadata": {"annotations": {ORIGINAL_PORTS: None, INTERCEPTED: None}},
                "spec": {"ports": json.loads(annotations[ORIGINAL_PORTS])},
            },
            content_type=MERGE_PATCH,
        )
        done.append(what)
    return done


async def restore_unheld(
    cluster: Cluster, namespace: str, name: str, *, progress: Progress = quiet
) -> list[str]:
    """Restore Deployment ``name`` and its Services if nobody holds its intercept; what it did."""
    what = describe("deployments", name, namespace)

    async def attempt() -> list[str]:
        current = await get(cluster, "deployments", namespace, name)
        annotations = dict(((current or {}).get("metadata") or {}).get("annotations") or {})
        if await holders(cluster, namespace, name):
            return []
        done = await _restore_services(cluster, namespace, name, progress)
        if current is not None and ORIGINAL_TEMPLATE in annotations:
            original = json.loads(annotations[ORIGINAL_TEMPLATE])
            ports = {int(k): int(v) for k, v in json.loads(annotations[AGENT_PORTS]).items()}
            ours = S.intercept_template(
                original,
                deployment=name,
                container=annotations.get(CONTAINER) or None,
                ports=ports,
                image=_agent_image(current["spec"]["template"]),
            )
            unchanged = _same_template(ours, current["spec"]["template"])
            if not unchanged:
                progress(f"{what} changed during the intercept: removing only the agent")
            replacement = copy.deepcopy(current)
            replacement["spec"]["template"] = (
                original if unchanged else strip_sidecar(current["spec"]["template"], name)
            )
            replacement["metadata"]["annotations"] = {
                k: v for k, v in annotations.items() if k not in DEPLOYMENT_ANNOTATIONS
            }
            progress(f"restoring {what}")
            await cluster.request(
                "PUT",
                path("deployments", namespace, name),
                what=f"restore {what}",
                body=replacement,
            )
            done.append(what)
        await delete(cluster, "secrets", namespace, S.keys_secret_name(name))
        await forget_leases(cluster, namespace, name)
        return done

    return await retry_conflicts(attempt, gave_up=f"{what} kept changing while tpconf restored it")


async def forget_leases(cluster: Cluster, namespace: str, name: str) -> None:
    """Delete every Lease on Deployment ``name`` (after its restore: those of crashed ``up``s;
    with ``down --all``: everyone's)."""
    listing = await cluster.request(
        "GET",
        path("leases", namespace),
        what=f'list the intercept leases in namespace "{namespace}"',
        query={"labelSelector": f"{INTERCEPTED}={L.label_value(name)}"},
    )
    for lease in listing.get("items") or []:
        await delete(cluster, "leases", namespace, lease["metadata"]["name"])


def _agent_image(template: Mapping[str, Any]) -> str:
    for container in template["spec"]["containers"]:
        if container.get("name") == M.AGENT_CONTAINER:
            return str(container.get("image"))
    return ""


def _same_template(expected: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether ``current`` is what tpconf wrote, up to what the API server fills in."""
    return _comparable(expected) == _comparable(current)


def _comparable(template: Mapping[str, Any]) -> JSON:
    # The API server adds defaults (terminationMessagePath, protocol, ...) to what tpconf
    # wrote: compare only the fields a person edits in a deploy.
    spec = template.get("spec") or {}
    return {
        "labels": (template.get("metadata") or {}).get("labels"),
        "annotations": (template.get("metadata") or {}).get("annotations"),
        "containers": [
            {k: c.get(k) for k in ("name", "image", "command", "args", "env", "envFrom")}
            for c in spec.get("containers") or []
        ],
        "volumes": [v.get("name") for v in spec.get("volumes") or []],
    }


async def orphans(
    cluster: Cluster,
    namespace: str,
    *,
    owner: str | None,
    project: str | None,
    restoring: Collection[str] = (),
) -> list[tuple[str, str, str]]:
    """(kind, namespace, name) of what a crash during a join can leave where no restore looks,
    because the Deployment never got its sidecar: this owner's and project's Leases (owner
    ``None``: anyone's), and the keys Secrets of Deployments that are not intercepted and that
    nobody else holds. The Leases on ``restoring`` Deployments are left to their restore."""
    leases = await cluster.request(
        "GET",
        path("leases", namespace),
        what=f'list the intercept leases in namespace "{namespace}"',
        query={"labelSelector": L.MANAGED_SELECTOR},
    )
    found: list[tuple[str, str, str]] = []
    others: set[str] = set()
    for lease in leases.get("items") or []:
        meta = lease["metadata"]
        target = (meta.get("labels") or {}).get(INTERCEPTED, "")
        mine = owner is None or L.is_ours(
            meta.get("annotations"), owner=owner, project=project or ""
        )
        if target in restoring:
            continue
        if mine:
            found.append(("leases", namespace, meta["name"]))
        elif live(lease):
            others.add(target)
    secrets = await cluster.request(
        "GET",
        path("secrets", namespace),
        what=f'list the intercept keys Secrets in namespace "{namespace}"',
        query={"labelSelector": INTERCEPTED},
    )
    for secret in secrets.get("items") or []:
        target = secret["metadata"]["labels"][INTERCEPTED]
        deployment = await get(cluster, "deployments", namespace, target)
        annotations = ((deployment or {}).get("metadata") or {}).get("annotations") or {}
        if ORIGINAL_TEMPLATE not in annotations and target not in others:
            found.append(("secrets", namespace, secret["metadata"]["name"]))
    return found
