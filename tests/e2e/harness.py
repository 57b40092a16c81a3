"""E2E harness: the objects tests put in the cluster, and `tpconf` as a real child process.

Builders return plain manifests (dicts with apiVersion and kind), usable with :func:`apply`
(kubectl) and with the ``kubernetes`` client alike; every image is local (``imagePullPolicy:
Never``: the cluster reaches no registry).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import LOCAL_STATE, E2ECluster

TPCONF = [sys.executable, "-m", "tpconf"]
NGINX = "tpconf.local/nginx:1"
TOOLS = "tpconf.local/debian:12"
"""Debian with curl, python3 and the usual tools."""

Manifest = dict[str, Any]

# ---- objects ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    """A pod volume and where the deployment's first container mounts it."""

    name: str
    source: Mapping[str, Any]
    """The volume's source, as in the pod spec: ``{"secret": {"secretName": "db"}}``."""
    path: str
    read_only: bool = False


def secret_volume(
    name: str,
    path: str,
    *,
    secret: str | None = None,
    read_only: bool = False,
    mode: int | None = None,
) -> Volume:
    """Secret ``secret`` (default: ``name``) as volume ``name`` at ``path``."""
    source: dict[str, Any] = {"secretName": secret or name}
    if mode is not None:
        source["defaultMode"] = mode
    return Volume(name, {"secret": source}, path, read_only)


def config_map_volume(
    name: str, path: str, *, config_map: str | None = None, read_only: bool = False
) -> Volume:
    """ConfigMap ``config_map`` (default: ``name``) as volume ``name`` at ``path``."""
    return Volume(name, {"configMap": {"name": config_map or name}}, path, read_only)


def container(
    name: str = "main",
    image: str = TOOLS,
    *,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    ports: Sequence[int] = (),
    **fields: Any,
) -> Manifest:
    """A container; ``fields`` are further container fields as the API spells them
    (``readinessProbe=...``, ``securityContext=...``)."""
    spec: Manifest = {"name": name, "image": image, "imagePullPolicy": "Never"}
    if command is not None:
        spec["command"] = list(command)
    if env:
        spec["env"] = [{"name": k, "value": v} for k, v in env.items()]
    if ports:
        spec["ports"] = [{"containerPort": p, "protocol": "TCP"} for p in ports]
    spec.update(fields)
    return spec


def deployment(
    name: str,
    image: str = NGINX,
    *,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    ports: Sequence[int] = (),
    volumes: Sequence[Volume] = (),
    replicas: int | None = None,
    labels: Mapping[str, str] | None = None,
    containers: Sequence[Manifest] | None = None,
    **pod_fields: Any,
) -> Manifest:
    """A Deployment selecting ``labels`` (default ``app: name``). One container ``main`` made
    of ``image``, ``command``, ``env`` and ``ports``, or ``containers`` as given; ``volumes``
    are mounted in the first one. ``pod_fields`` are further pod spec fields."""
    labels = dict(labels or {"app": name})
    if containers is None:
        containers = [container("main", image, command=command, env=env, ports=ports)]
    elif command is not None or env or ports:
        raise TypeError("command, env and ports describe the single container: not with containers")
    first, *rest = (dict(c) for c in containers)
    if volumes:
        mounts = [
            {"name": v.name, "mountPath": v.path, **({"readOnly": True} if v.read_only else {})}
            for v in volumes
        ]
        first["volumeMounts"] = [*first.get("volumeMounts", []), *mounts]
    pod: Manifest = {**pod_fields, "containers": [first, *rest]}
    if volumes:
        pod["volumes"] = [*pod.get("volumes", []), *({"name": v.name, **v.source} for v in volumes)]
    spec: Manifest = {
        "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if replicas is not None:
        spec["replicas"] = replicas
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }
    return copy.deepcopy(manifest)  # tests edit what they get: nothing shared with the arguments


def service(
    name: str, ports: Sequence[int], *, selector: Mapping[str, str] | None = None
) -> Manifest:
    """A ClusterIP Service of ``ports`` (target port = port) for the pods of ``selector``
    (default ``app: name``, what :func:`deployment` labels)."""
    entries: list[Manifest] = [{"port": p, "targetPort": p} for p in ports]
    if len(entries) > 1:
        for entry in entries:
            entry["name"] = f"tcp-{entry['port']}"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": dict(selector or {"app": name}), "ports": entries},
    }


def pod(
    name: str,
    image: str = TOOLS,
    *,
    command: Sequence[str] = ("sleep", "3600"),
    labels: Mapping[str, str] | None = None,
    **pod_fields: Any,
) -> Manifest:
    """A bare pod (``restartPolicy: Never``) of one container ``main`` running ``command``."""
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels or {"app": name})},
        "spec": {
            "restartPolicy": "Never",
            **pod_fields,
            "containers": [container("main", image, command=command)],
        },
    }
    return copy.deepcopy(manifest)


def secret(name: str, data: Mapping[str, str]) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": dict(data),
    }


def config_map(name: str, data: Mapping[str, str]) -> Manifest:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": dict(data)}


def apply(cluster: E2ECluster, namespace: str, *objects: Manifest) -> None:
    """``kubectl apply`` the objects into ``namespace``, in order."""
    items = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(items))


def wait_ready(
    cluster: E2ECluster, namespace: str, *objects: Manifest, timeout: float = 120
) -> None:
    """Wait until each Deployment has rolled out and each Pod is Ready (others: nothing)."""
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "Deployment":
            cluster.kubectl(
                "-n", namespace, "rollout", "status", f"deployment/{name}",
                f"--timeout={timeout:.0f}s", timeout=timeout + 30,
            )  # fmt: skip
        elif obj["kind"] == "Pod":
            cluster.kubectl(
                "-n", namespace, "wait", "--for=condition=Ready", f"pod/{name}",
                f"--timeout={timeout:.0f}s", timeout=timeout + 30,
            )  # fmt: skip


def deploy(cluster: E2ECluster, namespace: str, *objects: Manifest) -> None:
    """:func:`apply`, then :func:`wait_ready`."""
    apply(cluster, namespace, *objects)
    wait_ready(cluster, namespace, *objects)


def helloworld(cluster: E2ECluster, namespace: str, name: str = "helloworld") -> None:
    """The Telepresence docs' helloworld: nginx behind a Service on port 80, rolled out."""
    deploy(cluster, namespace, deployment(name, NGINX, ports=[80]), service(name, [80]))


def tools_pod(cluster: E2ECluster, namespace: str, name: str = "client") -> None:
    """A Ready pod with curl and python3 to run commands in (``kubectl exec NAME``)."""
    deploy(cluster, namespace, pod(name))


# ---- tpconf as a child process ----------------------------------------------------------------


def file_text(path: Path) -> str:
    """What a local command wrote so far ("" before it exists)."""
    return path.read_text() if path.exists() else ""


def tpconf_env(cluster: E2ECluster) -> dict[str, str]:
    env = dict(os.environ)
    env["KUBECONFIG"] = cluster.kubeconfig
    env["TPCONF_KUBECTL"] = cluster.kubectl_path
    env["NO_COLOR"] = "1"
    env["PATH"] = f"{LOCAL_STATE / 'bin'}:{env.get('PATH', '')}"
    return env


def wait_until(check: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


class Up:
    """One `tpconf up` in ``project``; its output goes to ``project/up.log``."""

    def __init__(self, cluster: E2ECluster, project: Path) -> None:
        self.cluster = cluster
        self.project = project
        self.log_path = project / "up.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> Up:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*TPCONF, "up", *args],
            cwd=self.project,
            env=tpconf_env(self.cluster),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120, *, after: int = 0) -> re.Match[str]:
        """Wait for ``pattern`` (a regex) in the output past offset ``after``."""

        def find() -> re.Match[str] | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"tpconf up exited ({self.process.returncode}) before {pattern!r}:\n"
                    + self.output[-3000:]
                )
            return re.compile(pattern, re.MULTILINE).search(self.output, after)

        try:
            match = wait_until(find, timeout, repr(pattern))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- up.log ---\n{self.output[-3000:]}") from None
        assert isinstance(match, re.Match)
        return match

    def stop(self, timeout: float = 120) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("tpconf up did not stop within the timeout") from None
        return self.process.returncode

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


def run_tpconf(
    cluster: E2ECluster, project: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run one tpconf command in ``project``, whatever its exit code."""
    return subprocess.run(
        [*TPCONF, *args],
        cwd=project,
        env=tpconf_env(cluster),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def tpconf(cluster: E2ECluster, project: Path, *args: str, timeout: float = 120) -> str:
    """Run one tpconf command in ``project``; return its stdout (fails on a non-zero exit)."""
    proc = run_tpconf(cluster, project, *args, timeout=timeout)
    assert proc.returncode == 0, f"tpconf {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def write_config(project: Path, text: str) -> None:
    """Save telepresence.yaml the way editors do: a temp file renamed over the original."""
    tmp = project / ".telepresence.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(project / "telepresence.yaml")
