"""The objects tpconf creates, replaces and deletes, and the one rule for whose they are.

An object is *ours* when it carries the label ``app.kubernetes.io/managed-by: tpconf`` and the
owner and project annotations of this user and project (:func:`ours`); only then does tpconf
replace or delete it. Everything that reads, writes or deletes a Deployment, Service or Secret
by name goes through the helpers here; writes that depend on what was read retry through
:func:`retry_conflicts`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio

from tpconf import errors
from tpconf.cluster import labels as L
from tpconf.cluster.client import MERGE_PATCH, Cluster, path
from tpconf.cluster.errors import Conflict
from tpconf.cluster.model import ProxyRequest

JSON = dict[str, Any]
Progress = Callable[[str], None]
T = TypeVar("T")

KINDS = {"deployments": "Deployment", "services": "Service", "secrets": "Secret"}
"""What tpconf creates, for the leftover listing; :func:`describe` also names Leases."""
_NAMES = {**KINDS, "leases": "Lease"}
#: Attempts of a conditional write before :func:`retry_conflicts` gives up.
CONFLICT_TRIES = 5


def quiet(_text: str) -> None:
    """The default ``progress``: says nothing."""


def describe(kind: str, name: str, namespace: str) -> str:
    """``Deployment "web" in namespace "dev"``, for messages."""
    return f'{_NAMES.get(kind, kind)} "{name}" in namespace "{namespace}"'


def ours(obj: Mapping[str, Any] | None, *, owner: str | None, project: str | None) -> bool:
    """Whether tpconf created ``obj`` for this owner and project.

    ``owner`` or ``project`` ``None`` (``tpconf down --all``) accepts any owner, but still only
    what tpconf created.
    """
    meta = (obj or {}).get("metadata") or {}
    if (meta.get("labels") or {}).get(L.MANAGED_BY) != L.MANAGED_BY_VALUE:
        return False
    if owner is None or project is None:
        return True
    return L.is_ours(meta.get("annotations"), owner=owner, project=project)


def released(obj: Mapping[str, Any]) -> bool:
    """Whether ``obj`` is tpconf's but nobody's now: the keys Secret of an ``existing``
    Deployment whose ``tpconf up`` has ended (it outlives the session, see ``proxies``)."""
    annotations = obj["metadata"].get("annotations") or {}
    return ours(obj, owner=None, project=None) and L.OWNER not in annotations


def check_ours(current: Mapping[str, Any], req: ProxyRequest, kind: str) -> None:
    """Raise unless ``req`` may write over ``current``: it is ours, or :func:`released`."""
    if ours(current, owner=req.owner, project=req.project) or released(current):
        return
    name = str(current["metadata"].get("name"))
    described = describe(kind, name, req.namespace)
    if not ours(current, owner=None, project=None):
        raise errors.ClusterError(
            f"{described} already exists and was not created by tpconf",
            hint=f"tpconf keeps the agent's keys in this Secret: delete it (`kubectl -n "
            f"{req.namespace} delete secret {name}`) and tpconf creates its own"
            if kind == "secrets"
            else "give the new Deployment another name with `new.name` (a personal one on a "
            "shared namespace: `name: NAME-${USER}`), or use `intercept:`, `swap:` or "
            "`existing:` for it instead of `new:`",
        )
    owner = (current["metadata"].get("annotations") or {})[L.OWNER]
    personal = (
        "; or give yours a name of its own with `new.name` (`name: NAME-${USER}`)"
        if kind == "deployments"
        else ""
    )
    raise errors.ClusterError(
        f"{described} is in use by tpconf of {owner} (another user or project)",
        hint=f"{owner} frees it by ending their `tpconf up` or with `tpconf down` in that "
        "project; `tpconf down --all` frees what tpconf has in the namespaces of "
        f"telepresence.yaml, whoever holds it{personal}",
    )


async def retry_conflicts(
    attempt: Callable[[], Awaitable[T]], *, gave_up: str, hint: str | None = None
) -> T:
    """Run ``attempt`` (read, check, write conditionally on what it read) until it does not
    conflict; after :data:`CONFLICT_TRIES` conflicts, a :class:`~tpconf.errors.ClusterError`.

    Controllers update the status of what tpconf writes now and then, which changes the
    ``resourceVersion`` a conditional write names: reading again is all it takes.
    """
    for tried in range(1, CONFLICT_TRIES + 1):
        try:
            return await attempt()
        except Conflict:
            await anyio.sleep(0.1 * tried)
    raise errors.ClusterError(gave_up, hint=hint)


async def get(cluster: Cluster, kind: str, namespace: str, name: str) -> JSON | None:
    """One object; ``None`` if there is none of that name."""
    try:
        return await cluster.request(
            "GET", path(kind, namespace, name), what=f"read {describe(kind, name, namespace)}"
        )
    except errors.NotFound:
        return None


async def delete(cluster: Cluster, kind: str, namespace: str, name: str) -> bool:
    """Delete one object (dependents in the background); ``False`` if it was already gone."""
    try:
        await cluster.request(
            "DELETE",
            path(kind, namespace, name),
            what=f"delete {describe(kind, name, namespace)}",
            body={"propagationPolicy": "Background"},
        )
    except errors.NotFound:
        return False
    return True


async def delete_ours(
    cluster: Cluster, kind: str, namespace: str, name: str, req: ProxyRequest, progress: Progress
) -> str | None:
    """Delete one object if it is ours; what was deleted, or ``None``."""
    if not ours(await get(cluster, kind, namespace, name), owner=req.owner, project=req.project):
        return None
    described = describe(kind, name, namespace)
    progress(f"deleting {described}")
    return described if await delete(cluster, kind, namespace, name) else None


async def apply(
    cluster: Cluster, kind: str, body: JSON, req: ProxyRequest, *, sensitive: bool = False
) -> JSON:
    """Create ``body``; if an object that :func:`check_ours` allows has that name, replace it.

    A Service is merge-patched instead, which keeps its allocated clusterIP (lists such as
    ``ports`` are replaced whole); anything else is replaced with a PUT.
    """
    ns = body["metadata"]["namespace"]
    name = body["metadata"]["name"]
    described = describe(kind, name, ns)
    try:
        return await cluster.request(
            "POST", path(kind, ns), what=f"create {described}", body=body, sensitive=sensitive
        )
    except Conflict as exc:
        if exc.reason != "AlreadyExists":
            raise

    async def replace() -> JSON:
        current = await cluster.request("GET", path(kind, ns, name), what=f"read {described}")
        check_ours(current, req, kind)
        if kind == "services":
            patch = {"metadata": body["metadata"], "spec": body["spec"]}
            return await cluster.request(
                "PATCH",
                path(kind, ns, name),
                what=f"update {described}",
                body=patch,
                content_type=MERGE_PATCH,
            )
        version = current["metadata"]["resourceVersion"]
        return await cluster.request(
            "PUT",
            path(kind, ns, name),
            what=f"replace {described}",
            body={**body, "metadata": {**body["metadata"], "resourceVersion": version}},
            sensitive=sensitive,
        )

    return await retry_conflicts(
        replace, gave_up=f"{described} kept changing while tpconf replaced it"
    )
