"""Fixtures of the cluster tests: the real local cluster, a namespace per test, agent keys.

``cluster`` (session) is the kubeconfig of a real cluster: ``$KUBECONFIG`` if set, else the local
one at /var/lib/tpconf-cluster/admin.kubeconfig if it answers, else ``make cluster`` starts it.
Setup objects are created through the plain ``kubernetes`` client (tests may import it; the
package may not). Nothing here mocks the API server.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncssh
import pytest
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from tpconf.cluster import AgentKeys, Cluster, New, Operation, ProxyRequest, connect

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL_KUBECONFIG = "/var/lib/tpconf-cluster/admin.kubeconfig"
AGENT_IMAGE = "tpconf/agent:0.1.0"
WORKLOAD_IMAGE = "tpconf.local/debian:12"
OWNER = "e2e@tests"
PROJECT = "0123456789abcdef"


def _answers(kubeconfig: str) -> bool:
    try:
        api = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, persist_config=False
        )
    except (ConfigException, OSError):
        return False
    try:
        resp = api.call_api("GET", api.configuration.host + "/readyz", _request_timeout=5)
        resp.read()
        return bool(resp.status == 200)
    except (ApiException, urllib3.exceptions.HTTPError, OSError):
        return False
    finally:
        api.close()


@pytest.fixture(scope="session")
def cluster() -> str:
    """The kubeconfig of a running cluster (started with `make cluster` if needed)."""
    env = os.environ.get("KUBECONFIG")
    if env:
        return env
    if os.path.exists(LOCAL_KUBECONFIG) and _answers(LOCAL_KUBECONFIG):
        return LOCAL_KUBECONFIG
    subprocess.run(["make", "-C", REPO, "cluster"], check=True, timeout=3600)
    return LOCAL_KUBECONFIG


@pytest.fixture(scope="session")
def admin_api(cluster: str) -> Iterator[k8s.ApiClient]:
    """The plain client, as admin: for test setup only."""
    api = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=cluster, persist_config=False
    )
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
async def kube(cluster: str, namespace: Namespace) -> AsyncIterator[Cluster]:
    """tpconf's own Cluster, as admin, defaulting to the test's namespace."""
    c = connect(kubeconfig=cluster, namespace=namespace.name)
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


def workload(name: str, replicas: int, *, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """An ordinary Deployment to swap: env, envFrom, a ConfigMap volume, a sidecar, probes."""
    labels = labels or {"app": name}
    restricted = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "runAsUser": 2000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "volumes": [{"name": "config", "configMap": {"name": f"{name}-config"}}],
                    "containers": [
                        {
                            "name": "app",
                            "image": WORKLOAD_IMAGE,
                            "imagePullPolicy": "Never",
                            "command": ["sleep", "infinity"],
                            "env": [{"name": "GREETING", "value": "hello from the pod"}],
                            "envFrom": [{"configMapRef": {"name": f"{name}-config"}}],
                            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                            "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1},
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}],
                            "securityContext": restricted,
                        },
                        {
                            "name": "sidecar",
                            "image": WORKLOAD_IMAGE,
                            "imagePullPolicy": "Never",
                            "command": ["sleep", "infinity"],
                            "securityContext": restricted,
                        },
                    ],
                },
            },
        },
    }


def config_map(name: str) -> dict[str, Any]:
    return {"metadata": {"name": f"{name}-config"}, "data": {"FROM_CONFIGMAP": "yes"}}
