"""Who a ``tpconf up`` (or ``down``, ``status``) is, and its API clients: identity and clusters.

A session has an id (labels every object it creates), an owner (``user@host``) and a project id
(a hash of the project directory): together they tell ``tpconf down`` what it may clean up. The
API client of each (context, namespace) is made once and shared, and RBAC is checked once per
namespace and operation, against the namespace's rules, asked once (:meth:`Session.warm` asks
before the first unit needs them). :meth:`Session.targets` says which contexts (with their API
servers) and namespaces a project would change, and refuses a context that `allowed-contexts`
does not list, before anything is changed. What a running ``up`` lends its units besides this (output, methods,
stopping) is :class:`~tpconf.reconcile.units.Services`.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from tpconf import cluster
from tpconf.cluster import Cluster
from tpconf.config import Project
from tpconf.errors import TpconfError

log = logging.getLogger(__name__)

#: The user name the agent's sshd accepts (tpconf/agent/entrypoint.py).
AGENT_USER = "tpconf"


def find_kubectl() -> str:
    """The kubectl that port-forwards: ``$TPCONF_KUBECTL``, else the first on ``PATH``."""
    configured = os.environ.get("TPCONF_KUBECTL")
    if configured:
        return configured
    found = shutil.which("kubectl")
    if found is None:
        raise TpconfError(
            "kubectl is not installed or not on PATH",
            hint="tpconf port-forwards to the proxy pod with kubectl; install it or set "
            "TPCONF_KUBECTL to its path",
        )
    return found


@dataclass(frozen=True)
class ClusterTarget:
    """A context a project changes: its API server and the namespaces touched in it."""

    context: str
    server: str
    namespaces: tuple[str, ...]

    def __str__(self) -> str:
        plural = "namespace" if len(self.namespaces) == 1 else "namespaces"
        return f"context {self.context} ({self.server}), {plural} {', '.join(self.namespaces)}"


@dataclass
class Session:
    """The identity of one ``tpconf up`` (or ``down``/``status``) run, and its API clients."""

    project_dir: Path
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    owner: str = field(default_factory=cluster.default_owner)
    kubeconfig: str | None = None
    kubectl: str = field(default_factory=find_kubectl)
    _clusters: dict[tuple[str | None, str | None], Cluster] = field(default_factory=dict)
    _lock: anyio.Lock = field(default_factory=anyio.Lock)
    _checked: set[tuple[int, str, type]] = field(default_factory=set)
    _rules: dict[tuple[int, str], list[dict[str, Any]]] = field(default_factory=dict)
    _rules_locks: dict[tuple[int, str], anyio.Lock] = field(default_factory=dict)

    @property
    def project(self) -> str:
        """The project id stored on everything this project creates."""
        return cluster.project_id(self.project_dir)

    @property
    def state_dir(self) -> Path:
        """Where tpconf keeps per-project files (volume roots default here too)."""
        return self.project_dir / ".tpconf"

    async def cluster(self, context: str | None, namespace: str | None) -> Cluster:
        """The API client for a context and namespace (``None``: the kubeconfig's current)."""
        key = (context, namespace)
        async with self._lock:
            if key not in self._clusters:
                self._clusters[key] = await anyio.to_thread.run_sync(
                    lambda: cluster.connect(
                        kubeconfig=self.kubeconfig, context=context, namespace=namespace
                    )
                )
            return self._clusters[key]

    async def preflight(self, client: Cluster, namespace: str, operation: type) -> None:
        """Check RBAC once per namespace and operation: a missing verb is named up front."""
        key = (id(client), namespace, operation)
        if key in self._checked:
            return
        rules = await self._namespace_rules(client, namespace)
        try:
            await cluster.preflight(client, namespace, operations=(operation,), rules=rules)
        except TpconfError:
            # A retry asks again: the missing permission may have been granted meanwhile.
            self._rules.pop((id(client), namespace), None)
            raise
        self._checked.add(key)

    async def _namespace_rules(self, client: Cluster, namespace: str) -> list[dict[str, Any]]:
        """The namespace's RBAC rules, asked once however many units start there at once."""
        key = (id(client), namespace)
        async with self._rules_locks.setdefault(key, anyio.Lock()):
            if key not in self._rules:
                self._rules[key] = await cluster.namespace_rules(client, namespace)
            return self._rules[key]

    async def warm(self, project: Project) -> None:
        """Ask for the RBAC rules of every namespace ``project`` changes now, while ``up``
        sets itself up, rather than when the first unit starts. Failures are left to the units'
        own checks, which report them."""
        async with anyio.create_task_group() as tg:
            for spec in project.deployments:
                tg.start_soon(self._warm_one, spec.context, spec.namespace)

    async def _warm_one(self, context: str | None, namespace: str | None) -> None:
        try:
            client = await self.cluster(context, namespace)
            await self._namespace_rules(client, namespace or client.namespace)
        except TpconfError as exc:
            log.debug("RBAC rules of %s not read ahead: %s", namespace, exc)

    async def targets(self, project: Project) -> list[ClusterTarget]:
        """The contexts and namespaces ``project``'s deployments change, from the kubeconfig
        alone (nothing is asked of the API servers); raises when `allowed-contexts` does not
        list one of the contexts (the current one included)."""
        found: dict[str, tuple[str, dict[str, None]]] = {}
        for spec in project.deployments:
            client = await self.cluster(spec.context, spec.namespace)
            name = client.context or spec.context or "(current)"
            _, namespaces = found.setdefault(name, (client.server, {}))
            namespaces[spec.namespace or client.namespace] = None
        allowed = project.allowed_contexts
        for name in found:
            if allowed is not None and name not in allowed:
                raise TpconfError(
                    f"context {name} is not in `allowed-contexts` of {project.display} "
                    f"({', '.join(allowed)}): nothing was changed",
                    hint="pick an allowed one with `--context NAME` (or `kubectl config "
                    "use-context NAME`), or add it to `allowed-contexts` if tpconf may change "
                    "that cluster",
                )
        return [
            ClusterTarget(name, server, tuple(namespaces))
            for name, (server, namespaces) in found.items()
        ]
