"""The bench's own namespace: created at start, deleted at the end even on failure.

Everything is created with the ``kubernetes`` client (no kubectl start-up time in the cluster
timings); kubectl is used only for ``port-forward`` and ``exec``, as a user would. Nothing here
depends on ``tpconf.cluster`` (being finished in parallel): the manifests are the ones
docs/agent.md describes.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import kubernetes.client
import kubernetes.config
import kubernetes.watch

from bench.echo import PORT, SERVER
from tpconf.tunnel import AGENT_SECRET_KEYS, ProxyKeys

KUBECTL = os.environ.get("KUBECTL", "/var/lib/tpconf-cluster/bin/kubectl")
if not os.path.exists(KUBECTL):
    KUBECTL = "kubectl"
AGENT_IMAGE = "tpconf/agent:0.1.0"
DEBIAN_IMAGE = "tpconf.local/debian:12"
LABELS = {"app.kubernetes.io/managed-by": "tpconf-bench"}

# The client's partial annotations do not help here (manifests are plain dicts).
client: Any = kubernetes.client
config: Any = kubernetes.config
watch: Any = kubernetes.watch


def kubeconfig() -> str | None:
    return os.environ.get("KUBECONFIG")


def kubectl(
    *args: str, timeout: float = 60.0, check: bool = True, input_text: str | None = None
) -> str:
    """Run kubectl (``input_text`` on its stdin); return stdout."""
    cmd = [KUBECTL]
    if kubeconfig():
        cmd += ["--kubeconfig", str(kubeconfig())]
    result = subprocess.run(
        [*cmd, *args], input=input_text, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def agent_pod(name: str, secret: str) -> dict[str, Any]:
    """An agent pod as docs/agent.md describes it (keys 0440, gid 0, restricted context)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {**LABELS, "app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": 1000, "runAsGroup": 0},
            "volumes": [
                {
                    "name": "keys",
                    "secret": {
                        "secretName": secret,
                        "defaultMode": 0o440,
                        "items": [{"key": k, "path": k} for k in AGENT_SECRET_KEYS],
                    },
                }
            ],
            "containers": [
                {
                    "name": "agent",
                    "image": AGENT_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "volumeMounts": [
                        {"name": "keys", "mountPath": "/etc/tpconf/keys", "readOnly": True}
                    ],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                }
            ],
        },
    }


def echo_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {**LABELS, "app": "echo"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "echo",
                    "image": DEBIAN_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python3", "-u", "-c", SERVER, "0.0.0.0", str(PORT)],
                    "ports": [{"containerPort": PORT}],
                    "readinessProbe": {
                        "tcpSocket": {"port": PORT},
                        "periodSeconds": 1,
                    },
                }
            ],
        },
    }


def echo_service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo", "labels": LABELS},
        "spec": {"selector": {"app": "echo"}, "ports": [{"port": PORT, "targetPort": PORT}]},
    }


@dataclass
class BenchNamespace:
    """The namespace, its agent keys, and where things are."""

    name: str
    keys: ProxyKeys
    core: Any
    agent: str = "agent"
    echo: str = "echo-server"
    echo_ip: str = ""
    """The echo Service's ClusterIP."""

    def create_keys_secret(self, secret: str) -> None:
        data = {k: v for k, v in self.keys.to_secret_data().items() if k in AGENT_SECRET_KEYS}
        body = {"metadata": {"name": secret, "labels": LABELS}, "stringData": data}
        self.core.create_namespaced_secret(self.name, body)

    def create_pod(self, manifest: dict[str, Any]) -> None:
        self.core.create_namespaced_pod(self.name, manifest)

    def delete_pod(self, name: str) -> None:
        self.core.delete_namespaced_pod(name, self.name, grace_period_seconds=0)

    def wait_ready(self, names: list[str], timeout: float = 90.0) -> dict[str, float]:
        """Wait until the pods are Ready; return when each was seen Ready (time.monotonic)."""
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < len(names) and time.monotonic() < deadline:
            stream = watch.Watch().stream(
                self.core.list_namespaced_pod,
                self.name,
                timeout_seconds=max(1, int(deadline - time.monotonic())),
            )
            for event in stream:
                pod = event["object"]
                if pod.metadata.name in names and _ready(pod):
                    seen.setdefault(pod.metadata.name, time.monotonic())
                if len(seen) == len(names):
                    break
        missing = [n for n in names if n not in seen]
        if missing:
            raise RuntimeError(f"pods not Ready within {timeout:g} s: {missing}")
        return seen


def _ready(pod: Any) -> bool:
    for cond in pod.status.conditions or []:
        if cond.type == "Ready" and cond.status == "True":
            return True
    return False


class ReadyWatcher:
    """Watches one pod in a thread and records when it is first seen Ready."""

    def __init__(self, ns: BenchNamespace, name: str, timeout: float = 90.0) -> None:
        self.ready_at: float | None = None
        self.event = threading.Event()
        self._ns, self._name, self._timeout = ns, name, timeout
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait(5)

    def _run(self) -> None:
        deadline = time.monotonic() + self._timeout
        self._started.set()
        for event in self._watch.stream(
            self._ns.core.list_namespaced_pod,
            self._ns.name,
            field_selector=f"metadata.name={self._name}",
            timeout_seconds=int(self._timeout),
        ):
            if _ready(event["object"]):
                self.ready_at = time.monotonic()
                self.event.set()
                break
            if time.monotonic() > deadline:
                break
        self._watch.stop()
        self.event.set()


@contextmanager
def bench_namespace(*, wait: float = 90.0) -> Iterator[BenchNamespace]:
    """Create ``tpconf-bench-<random>`` with an agent pod and an echo Service; delete it after."""
    config.load_kube_config(config_file=kubeconfig())
    core = client.CoreV1Api()
    name = f"tpconf-bench-{secrets.token_hex(4)}"
    core.create_namespace({"metadata": {"name": name, "labels": LABELS}})
    try:
        ns = BenchNamespace(name=name, keys=ProxyKeys.generate(comment="bench"), core=core)
        ns.create_keys_secret("agent-keys")
        ns.create_pod(agent_pod(ns.agent, "agent-keys"))
        ns.create_pod(echo_pod(ns.echo))
        service = core.create_namespaced_service(name, echo_service())
        ns.echo_ip = str(service.spec.cluster_ip)
        ns.wait_ready([ns.agent, ns.echo], timeout=wait)
        yield ns
    finally:
        try:
            core.delete_namespace(name, grace_period_seconds=0, propagation_policy="Background")
        except Exception as exc:  # noqa: BLE001 - report, never mask the real error
            print(f"bench: could not delete namespace {name}: {exc}")
