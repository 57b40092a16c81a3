"""The local cluster really works: the Telepresence docs' helloworld scenario, inside the cluster.

Scope: what the rest of the e2e suite relies on (pod networking, Service VIPs, cluster DNS with
the search list, Service env vars, service-account volumes, port-forward, exec, logs, the Python
client). Nothing of tpconf is used here.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import E2ECluster
from tests.e2e import harness
from tests.e2e.harness import tools_pod

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture
def helloworld(cluster: E2ECluster, namespace: str) -> str:
    harness.helloworld(cluster, namespace)
    return namespace


def test_helloworld_reachable_by_every_service_name_form(
    cluster: E2ECluster, helloworld: str
) -> None:
    ns = helloworld
    tools_pod(cluster, ns, "client")
    for host in ("helloworld", f"helloworld.{ns}", f"helloworld.{ns}.svc.cluster.local"):
        out = cluster.kubectl(
            "-n", ns, "exec", "client", "--", "curl", "-sS", "--max-time", "10", f"http://{host}/"
        ).stdout  # fmt: skip
        assert "Welcome to nginx!" in out, host


def test_pod_started_after_service_gets_service_env_and_serviceaccount_files(
    cluster: E2ECluster, helloworld: str
) -> None:
    ns = helloworld
    tools_pod(cluster, ns, "late")
    env = cluster.kubectl("-n", ns, "exec", "late", "--", "env").stdout
    assert re.search(r"^HELLOWORLD_SERVICE_HOST=10\.", env, re.MULTILINE), env
    assert re.search(r"^KUBERNETES_SERVICE_HOST=", env, re.MULTILINE), env
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    listing = cluster.kubectl("-n", ns, "exec", "late", "--", "ls", sa).stdout.split()
    assert {"ca.crt", "namespace", "token"} <= set(listing)
    assert cluster.kubectl("-n", ns, "exec", "late", "--", "cat", f"{sa}/namespace").stdout == ns


def test_port_forward_and_logs(cluster: E2ECluster, helloworld: str) -> None:
    ns = helloworld
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with subprocess.Popen(
        [cluster.kubectl_path, "--kubeconfig", cluster.kubeconfig, "-n", ns,
         "port-forward", "deployment/helloworld", f"{port}:80"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as pf:  # fmt: skip
        try:
            assert pf.stdout is not None
            assert "Forwarding from" in pf.stdout.readline()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                assert "Welcome to nginx!" in response.read().decode()
        finally:
            pf.terminate()
            pf.wait(timeout=10)
    deadline = time.monotonic() + 30
    logs = ""
    while time.monotonic() < deadline and "GET / " not in logs:
        logs = cluster.kubectl("-n", ns, "logs", "deployment/helloworld").stdout
        time.sleep(0.5)
    assert "GET / " in logs


def test_python_client_lists_pods(cluster: E2ECluster, helloworld: str) -> None:
    from kubernetes import client  # only tpconf.cluster imports kubernetes in the package

    api_client = cluster.api_client()
    pods = client.CoreV1Api(api_client).list_namespaced_pod(
        helloworld, label_selector="app=helloworld"
    )
    names = [str(p.metadata.name) for p in pods.items if p.metadata is not None]
    assert [name.startswith("helloworld-") for name in names] == [True]
