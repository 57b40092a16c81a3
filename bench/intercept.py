"""Row 10: ``intercept``: what the sidecar adds to requests that stay with the app, and what a
matching request costs compared with the same request through ``swap``.

In the bench namespace: Deployment ``iweb`` (1 replica, a Python HTTP/1.1 server on 8080 that
answers ``app``), its Service, and a client pod that times requests itself (Python's
``http.client``, a new connection per request, as a teammate's ``curl`` makes; the first three
are warm-up) and prints the milliseconds as JSON. A real ``tpconf up`` intercepts ``iweb`` with
``headers: {x-bench: me}``, its ``run`` a local server that answers ``local``. Interleaved per
round, against the same intercepted pod:

- *straight to the pod*: ``POD_IP:8080``, the app with nothing in the way;
- *through the agent, not matching*: ``POD_IP:AGENT_PORT`` without the header: the router
  parses the request and passes it to the app (target: at most 1 ms more at p50);
- *intercept, matching*: through the Service with the header: router, SSH over port-forward,
  the local server.

Then the same Deployment swapped (``swap: iweb``, the same local server, the swapped container's
port exposed automatically): through the Service to the local server, the matching row's
reference.
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

import anyio

from bench.context import Bench
from bench.core import Row, within_ms
from bench.kube import DEBIAN_IMAGE, LABELS, kubectl
from bench.uphost import running_up

NAME = "iweb"
CLIENT = "iclient"

APP = textwrap.dedent(
    """
    import http.server, sys
    word = sys.argv[1].encode() + b"\\n"
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", str(len(word)))
            self.end_headers()
            self.wfile.write(word)
        def log_message(self, *args):
            pass
    http.server.ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])), H).serve_forever()
    """
)

TIMER = textwrap.dedent(
    """
    import http.client, json, sys, time
    host, port, header, count, want = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    headers = dict([header.split(": ", 1)]) if header else {}
    out = []
    for i in range(count + 3):
        t = time.perf_counter()
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/", headers=headers)
        body = conn.getresponse().read()
        conn.close()
        if body.strip() != want.encode():
            raise SystemExit(f"expected {want!r}, got {body!r}")
        if i >= 3:
            out.append((time.perf_counter() - t) * 1e3)
    print(json.dumps(out))
    """
)


def _manifests() -> list[dict[str, object]]:
    labels = {**LABELS, "app": NAME}
    app = {
        "name": "main",
        "image": DEBIAN_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-c", APP, "app", "0.0.0.0", "8080"],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
    }
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": NAME, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": NAME}},
                "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [app]}},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": NAME, "labels": LABELS},
            "spec": {"selector": {"app": NAME}, "ports": [{"port": 8080, "targetPort": "http"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": CLIENT, "labels": LABELS},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "main",
                        "image": DEBIAN_IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["sleep", "3600"],
                    }
                ],
            },
        },
    ]


def _config(ns: str, operation: Mapping[str, object]) -> str:
    entry = {
        **operation,
        "volumes": False,
        "run": [sys.executable, "app.py", "local", "127.0.0.1", "8080"],
    }
    return json.dumps({"version": 1, "namespace": ns, "deployments": {NAME: entry}})


def _prepare(project: Path) -> None:
    (project / "app.py").write_text(APP)


def _time(ns: str, host: str, port: int, header: str, count: int, want: str) -> list[float]:
    out = kubectl(
        "-n", ns, "exec", CLIENT, "--", "python3", "-c", TIMER,
        host, str(port), header, str(count), want, timeout=300,
    )  # fmt: skip
    samples: list[float] = json.loads(out)
    return samples


def _settled(ns: str, service: str, header: str) -> None:
    """Wait until the Service answers from the local server: ``ready`` can come before the
    endpoints of the replaced pods are gone from kube-proxy's rules (swap) or the local
    server listens."""
    deadline = time.monotonic() + 60
    while True:
        try:
            _time(ns, service, 8080, header, 3, "local")
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _agent_pod(ns: str) -> tuple[str, int]:
    """The intercepted pod's IP and the agent's port in front of 8080."""
    pods = json.loads(
        kubectl(
            "-n", ns, "get", "pods", "-l", f"app={NAME},tpconf.io/agent=intercept", "-o", "json"
        )
    )["items"]
    pod = next(p for p in pods if not p["metadata"].get("deletionTimestamp"))
    agent = next(c for c in pod["spec"]["containers"] if c["name"] == "tpconf-agent")
    port = next(p["containerPort"] for p in agent["ports"] if p["name"] == "tpconf-8080")
    return pod["status"]["podIP"], int(port)


def _measure(bench: Bench) -> None:
    ns = bench.ns.name
    count = 20 if bench.quick else 200
    rounds = 1 if bench.quick else 5
    app_name = "intercept: a request that stays with the app (new connection)"
    direct = bench.table.add(Row(app_name, "straight to the pod", "ms"))
    through = bench.table.add(
        Row(app_name, "through the agent, not matching", "ms", reference="straight to the pod")
    )
    through.target, through.check = "at most 1 ms more at p50", within_ms(1.0)
    local_name = "a request to the local process (new connection, via the Service)"
    swapped = bench.table.add(Row(local_name, "swap", "ms"))
    matched = bench.table.add(Row(local_name, "intercept, matching", "ms", reference="swap"))
    matched.note = (
        "the agent's router, then an SSH remote forward over the port-forward, as swap's expose"
    )
    for manifest in _manifests():
        kubectl("-n", ns, "apply", "-f", "-", input_text=json.dumps(manifest))
    kubectl("-n", ns, "rollout", "status", f"deployment/{NAME}", "--timeout=180s", timeout=200)
    kubectl("-n", ns, "wait", "--for=condition=Ready", f"pod/{CLIENT}", "--timeout=120s")
    service = f"{NAME}.{ns}"
    header = "x-bench: me"
    intercept = {"intercept": {"deployment": NAME, "headers": {"x-bench": "me"}}}
    with running_up(_config(ns, intercept), _prepare) as up:
        up.wait_line(rf"^{NAME}\s+ready", 300)
        ip, agent = _agent_pod(ns)
        _settled(ns, service, header)
        for _ in range(rounds):
            direct.samples += _time(ns, ip, 8080, "", count, "app")
            through.samples += _time(ns, ip, agent, "", count, "app")
            matched.samples += _time(ns, service, 8080, header, count, "local")
    kubectl("-n", ns, "rollout", "status", f"deployment/{NAME}", "--timeout=180s", timeout=200)
    with running_up(_config(ns, {"swap": NAME}), _prepare) as up:
        up.wait_line(rf"^{NAME}\s+ready", 300)
        _settled(ns, service, "")
        for _ in range(rounds):
            swapped.samples += _time(ns, service, 8080, "", count, "local")
    for row in (direct, through, matched, swapped):
        row.extra["p90"] = statistics.quantiles(row.samples, n=10)[-1]


async def intercept(bench: Bench) -> None:
    """Latency the intercept sidecar adds; a matching request vs the same through swap."""
    await anyio.to_thread.run_sync(_measure, bench)
