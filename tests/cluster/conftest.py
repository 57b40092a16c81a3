"""Fixtures of the cluster tests: a namespace per test, tpconf's client, agent keys.

The cluster itself is the shared session fixture ``cluster`` (tests/conftest.py: an
:class:`~tests.conftest.E2ECluster`, never started from here). Setup objects are created through
the plain ``kubernetes`` client (tests may import it; the package may not). Nothing here mocks
the API server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncssh
import pytest
from kubernetes import client as k8s

from tests.conftest import E2ECluster
from tests.e2e import harness
from tests.e2e.harness import config_map_volume, container, deployment
from tpconf.cluster import AgentKeys, Cluster, New, Operation, ProxyRequest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGENT_IMAGE = "tpconf/agent:0.1.0"
WORKLOAD_IMAGE = harness.TOOLS
OWNER = "e2e@tests"
PROJECT = "0123456789abcdef"


@pytest.fixture(scope="session")
def admin_api(cluster: E2ECluster) -> Iterator[k8s.ApiClient]:
    """The plain client, as admin: for test setup only."""
    api: Any = cluster.api_client()  # Any: the client's methods are untyped
    yield api
    api.close()


@dataclass
class Namespace:
    """A test namespace and the admin client's typed APIs (dict bodies) for setup."""

    name: str
    api: k8s.ApiClient

    # Typed as Any: setup passes plain dicts, which the client accepts (and validates).
    @property
    def core(self) -> Any:
        return k8s.CoreV1Api(self.api)

    @property
    def apps(self) -> Any:
        return k8s.AppsV1Api(self.api)

    @property
    def rbac(self) -> Any:
        return k8s.RbacAuthorizationV1Api(self.api)

    def label(self, labels: dict[str, str]) -> None:
        self.core.patch_namespace(self.name, {"metadata": {"labels": labels}})

    def deployment(self, name: str) -> Any:
        return self.apps.read_namespaced_deployment(name, self.name)


@pytest.fixture
def namespace(admin_api: k8s.ApiClient) -> Iterator[Namespace]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    name = f"tpconf-e2e-{uuid.uuid4().hex[:8]}"
    core: Any = k8s.CoreV1Api(admin_api)
    core.create_namespace({"metadata": {"name": name, "labels": {"tpconf-e2e": "true"}}})
    try:
        yield Namespace(name=name, api=admin_api)
    finally:
        core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture
async def kube(cluster: E2ECluster, namespace: Namespace) -> AsyncIterator[Cluster]:
    """tpconf's own Cluster, as admin, defaulting to the test's namespace."""
    c = cluster.connect(namespace.name)
    yield c
    c.close()


@pytest.fixture(scope="session")
def keys() -> AgentKeys:
    """A real host key and client key pair (OpenSSH formats), as tpconf.tunnel would make."""
    host = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    return AgentKeys(
        host_private_key=host.export_private_key().decode(),
        authorized_keys=client_key.export_public_key().decode(),
    )


def proxy_request(
    namespace: str,
    keys: AgentKeys,
    *,
    name: str = "web",
    operation: Operation | None = None,
    ports: tuple[int, ...] = (8080,),
    image: str = AGENT_IMAGE,
    owner: str = OWNER,
    project: str = PROJECT,
    session: str | None = None,
) -> ProxyRequest:
    return ProxyRequest(
        name=name,
        namespace=namespace,
        operation=operation or New(),
        agent_image=image,
        session_id=session or uuid.uuid4().hex[:12],
        owner=owner,
        project=project,
        keys=keys,
        expose_remote_ports=ports,
    )


RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 2000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def workload(name: str, replicas: int, *, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """An ordinary Deployment to swap: env, envFrom, a ConfigMap volume, a sidecar, probes."""
    app = container(
        "app",
        WORKLOAD_IMAGE,
        command=["sleep", "infinity"],
        env={"GREETING": "hello from the pod"},
        ports=[8080],
        envFrom=[{"configMapRef": {"name": f"{name}-config"}}],
        readinessProbe={"exec": {"command": ["true"]}, "periodSeconds": 1},
        securityContext=dict(RESTRICTED),
    )
    sidecar = container(
        "sidecar", WORKLOAD_IMAGE, command=["sleep", "infinity"], securityContext=dict(RESTRICTED)
    )
    return deployment(
        name,
        replicas=replicas,
        labels=labels,
        containers=[app, sidecar],
        volumes=[config_map_volume("config", "/etc/app", config_map=f"{name}-config")],
        terminationGracePeriodSeconds=1,
    )


def config_map(name: str) -> dict[str, Any]:
    """The ConfigMap :func:`workload` ``name`` reads."""
    return harness.config_map(f"{name}-config", {"FROM_CONFIGMAP": "yes"})
