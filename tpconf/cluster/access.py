"""What each operation may need to do in a namespace (:data:`ACCESS`, the same list as
docs/rbac.yaml), and :func:`preflight`, which checks it before anything is created."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import anyio

from tpconf import errors
from tpconf.cluster.client import Cluster
from tpconf.cluster.errors import RBAC_HINT
from tpconf.cluster.model import Existing, Intercept, New, Swap

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
    Intercept: (
        ("update", "apps", "deployments"),
        ("patch", "apps", "deployments"),
        ("list", "", "services"),
        ("patch", "", "services"),
        ("get", "coordination.k8s.io", "leases"),
        ("list", "coordination.k8s.io", "leases"),
        ("create", "coordination.k8s.io", "leases"),
        ("patch", "coordination.k8s.io", "leases"),
        ("delete", "coordination.k8s.io", "leases"),
    ),
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


def granted(rules: Sequence[dict[str, Any]], verb: str, group: str, resource: str) -> bool:
    """Whether the ``resourceRules`` of a SelfSubjectRulesReview allow ``verb`` on every object
    of ``resource`` (``pods/portforward``: a subresource) in API ``group``.

    Matched as RBAC matches: ``*`` for any verb, group or resource, ``*/SUB`` for a subresource
    of any resource; a rule limited to ``resourceNames`` does not count (tpconf's objects have
    names of their own).
    """
    _, _, sub = resource.partition("/")
    for rule in rules:
        if rule.get("resourceNames"):
            continue
        verbs, groups = rule.get("verbs") or [], rule.get("apiGroups") or []
        resources = rule.get("resources") or []
        if not ("*" in verbs or verb in verbs) or not ("*" in groups or group in groups):
            continue
        if "*" in resources or resource in resources or (sub and f"*/{sub}" in resources):
            return True
    return False


async def _review(cluster: Cluster, kind: str, spec: dict[str, Any], what: str) -> dict[str, Any]:
    """The ``status`` of a self-review (``SelfSubjectRulesReview``, ``SelfSubjectAccessReview``)."""
    review = await cluster.request(
        "POST",
        f"/apis/authorization.k8s.io/v1/{kind.lower()}s",
        what=what,
        body={"apiVersion": "authorization.k8s.io/v1", "kind": kind, "spec": spec},
    )
    status: dict[str, Any] = review.get("status") or {}
    return status


async def namespace_rules(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    """What RBAC lets this user do in ``namespace`` (one SelfSubjectRulesReview): the
    ``resourceRules`` :func:`preflight` matches with :func:`granted`; none when the user may
    not ask: :func:`preflight`'s access reviews then say what is missing."""
    what = f'list your permissions in namespace "{namespace}"'
    try:
        status = await _review(cluster, "SelfSubjectRulesReview", {"namespace": namespace}, what)
    except errors.Forbidden:
        return []
    rules = status.get("resourceRules") or []
    return [rule for rule in rules if isinstance(rule, dict)]


async def preflight(
    cluster: Cluster,
    namespace: str,
    operations: Iterable[type] = (New, Swap, Existing),
    *,
    rules: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Check that tpconf may do what ``operations`` need (``rules``: the namespace's, from
    :func:`namespace_rules`, when the caller already has them).

    One SelfSubjectRulesReview lists what RBAC allows; whatever its rules do not cover (a
    denial, or a grant only another authorizer knows: the review is best effort) is asked with
    a SelfSubjectAccessReview each. The 22 reviews one by one took a quarter of a second of
    ``up``'s start on the local cluster; the rules review takes one request.

    Raises :class:`~tpconf.errors.Forbidden` naming every missing ``verb resource`` (e.g.
    ``create pods/portforward``) before anything is created, instead of failing half-way.
    """
    needed = required_access(operations)
    if rules is None:
        rules = await namespace_rules(cluster, namespace)
    unsure = [triple for triple in needed if not granted(rules, *triple)]
    denied: list[str] = []

    async def check(verb: str, group: str, resource: str) -> None:
        base, _, sub = resource.partition("/")
        attrs = {"namespace": namespace, "verb": verb, "group": group, "resource": base}
        if sub:
            attrs["subresource"] = sub
        what = f"check access to {verb} {_qualified(group, resource)}"
        spec = {"resourceAttributes": attrs}
        if not (await _review(cluster, "SelfSubjectAccessReview", spec, what)).get("allowed"):
            denied.append(f"{verb} {_qualified(group, resource)}")

    async with anyio.create_task_group() as tg:
        for verb, group, resource in unsure:
            tg.start_soon(check, verb, group, resource)
    if denied:
        order = {f"{v} {_qualified(g, r)}": i for i, (v, g, r) in enumerate(needed)}
        denied.sort(key=order.__getitem__)
        raise errors.Forbidden(
            f'missing permissions in namespace "{namespace}": {", ".join(denied)}',
            hint=RBAC_HINT.format(namespace=namespace),
        )
