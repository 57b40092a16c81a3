"""E2E: `intercept` on the real cluster: the team keeps the service while a developer receives
its traffic, all of it or the requests their headers select.

Scope: the whole path (sidecar rollout, Services pointed at it, a route per replica over SSH,
the local process with the app container's env, exact restore) with `tpconf up` as a child
process, as a developer runs it; requests come from a pod through the Service, as a teammate's.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import E2ECluster
from tests.e2e.harness import (
    Up,
    container,
    deploy,
    deployment,
    pod,
    run_tpconf,
    tools_pod,
    tpconf,
    tpconf_env,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

#: The team's app: answers `app POD` on 8080 and shuts down the way a well-run service does
#: (it keeps serving for a few seconds after it is told to stop, while endpoints update).
APP = textwrap.dedent(
    """
    import http.server, socket
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = ("app " + socket.gethostname() + "\\n").encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.ThreadingHTTPServer(("", 8080), H).serve_forever()
    """
)

#: A developer's local process: answers `NAME GREETING` (GREETING from the pod's env).
LOCAL = textwrap.dedent(
    """
    import http.server, os, sys
    name, port = sys.argv[1], int(sys.argv[2])
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = (name + " " + os.environ.get("GREETING", "?") + "\\n").encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


#: What Pod Security `restricted` asks of every container.
RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def web(replicas: int = 2, *, sidecar: dict[str, Any] | None = None) -> dict[str, Any]:
    """The team's Deployment `web` (named port `http`), rolling updates without downtime."""
    main = container(
        "main",
        command=["python3", "-c", APP],
        env={"GREETING": "hello-from-the-pod"},
        ports=[8080],
        readinessProbe={"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        lifecycle={"preStop": {"sleep": {"seconds": 3}}},
        securityContext=RESTRICTED,
    )
    main["ports"][0]["name"] = "http"
    manifest = deployment(
        "web",
        containers=[main, *([sidecar] if sidecar else [])],
        replicas=replicas,
        securityContext={
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    )
    manifest["spec"]["strategy"] = {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    return manifest


def web_service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }


def project(tmp_path: Path, name: str, namespace: str, entry: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "local.py").write_text(LOCAL)
    write_config(
        directory,
        f"version: 1\nnamespace: {namespace}\ndeployments:\n"
        + textwrap.indent(textwrap.dedent(entry).strip(), "  ")
        + "\n",
    )
    return directory


def answers(cluster: E2ECluster, namespace: str, header: str, prefix: str) -> None:
    """Wait until a request with ``header`` gets ``prefix`` (the local process has started)."""
    wait_until(
        lambda: curl(cluster, namespace, header).startswith(prefix),
        60,
        f"a request with {header!r} to reach {prefix!r}",
    )


def curl(cluster: E2ECluster, namespace: str, *headers: str) -> str:
    """One request from the client pod through the Service: the body, or curl's error."""
    args = [arg for header in headers for arg in ("-H", header)]
    out = cluster.kubectl(
        "-n", namespace, "exec", "client", "--", "curl", "-s", "--max-time", "10", *args,
        "http://web/", check=False,
    )  # fmt: skip
    return out.stdout.strip() if out.returncode == 0 else f"curl failed: {out.stderr.strip()}"


def state(cluster: E2ECluster, namespace: str) -> tuple[str, str]:
    """The Deployment's pod template and the Service's spec, as JSON text."""
    dep = json.loads(
        cluster.kubectl("-n", namespace, "get", "deployment", "web", "-o", "json").stdout
    )
    svc = json.loads(cluster.kubectl("-n", namespace, "get", "service", "web", "-o", "json").stdout)
    meta = {k: svc["metadata"].get(k) for k in ("labels", "annotations")}
    return (
        json.dumps(dep["spec"]["template"], sort_keys=True),
        json.dumps({"spec": svc["spec"], **meta}, sort_keys=True),
    )


def replica_sets(cluster: E2ECluster, namespace: str) -> dict[str, int]:
    listing = json.loads(cluster.kubectl("-n", namespace, "get", "rs", "-o", "json").stdout)
    return {rs["metadata"]["name"]: rs["spec"]["replicas"] for rs in listing["items"]}


def restored(cluster: E2ECluster, namespace: str, before: tuple[str, str], rs: str) -> None:
    """The Deployment and Service are byte-identical to ``before``, the original ReplicaSet
    runs every replica again, and nothing of tpconf is left."""
    cluster.kubectl(
        "-n", namespace, "rollout", "status", "deployment/web", "--timeout=180s", timeout=200
    )
    assert state(cluster, namespace) == before
    sets = replica_sets(cluster, namespace)
    assert sets[rs] == 2 and sum(sets.values()) == 2, sets
    leftovers = cluster.kubectl(
        "-n",
        namespace,
        "get",
        "secrets,leases",
        "-l",
        "app.kubernetes.io/managed-by=tpconf",
        "-o",
        "name",
    ).stdout.strip()
    assert leftovers == ""


@dataclass
class Loop:
    """What a teammate's request loop saw: every answer's status (or curl's error)."""

    codes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [code for code in self.codes if code != "200"]


@contextmanager
def request_loop(cluster: E2ECluster, namespace: str) -> Iterator[Loop]:
    """A teammate's requests through the Service, one connection each, for as long as the block
    runs."""
    script = (
        "rm -f /tmp/stop /tmp/codes; while [ ! -f /tmp/stop ]; do "
        "curl -s -o /dev/null -w '%{http_code}\\n' --max-time 5 http://web/ >> /tmp/codes "
        "|| echo curl-$? >> /tmp/codes; done"
    )
    loop = subprocess.Popen(
        [cluster.kubectl_path, "--kubeconfig", cluster.kubeconfig, "-n", namespace, "exec",
         "client", "--", "sh", "-c", script],
        env=tpconf_env(cluster),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seen = Loop()
    try:
        yield seen
    finally:
        cluster.kubectl("-n", namespace, "exec", "client", "--", "touch", "/tmp/stop")
        loop.wait(30)
        codes = cluster.kubectl("-n", namespace, "exec", "client", "--", "cat", "/tmp/codes").stdout
        seen.codes.extend(codes.split())


@pytest.fixture
def ups(cluster: E2ECluster) -> Iterator[Callable[[Path], Up]]:
    """Starts `tpconf up` in a project; whatever a test leaves running is stopped after it."""
    started: list[Up] = []

    def start(directory: Path) -> Up:
        up = Up(cluster, directory).start()
        started.append(up)
        return up

    yield start
    for up in started:
        assert up.process is not None
        if up.process.poll() is None:
            up.stop()


@pytest.fixture
def team(cluster: E2ECluster, namespace: str) -> str:
    """The team's `web` (2 replicas) and a client pod, in a namespace that enforces Pod
    Security `restricted` (the sidecar must keep the pods admitted); its ReplicaSet's name."""
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    client = pod(
        "client",
        securityContext={
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    )
    client["spec"]["containers"][0]["securityContext"] = RESTRICTED
    deploy(cluster, namespace, web(), web_service(), client)
    (rs,) = replica_sets(cluster, namespace)
    answers(cluster, namespace, "x-any: 1", "app web-")  # the endpoints are published
    return rs


def test_an_intercept_with_headers_takes_only_matching_requests_and_nobody_loses_the_service(
    cluster: E2ECluster,
    namespace: str,
    team: str,
    tmp_path: Path,
    ups: Callable[[Path], Up],
) -> None:
    rs = team
    before = state(cluster, namespace)
    alice = project(
        tmp_path,
        "alice",
        namespace,
        """
        web:
          intercept: {deployment: web, headers: {x-dev-user: alice}}
          volumes: false
          run: [python3, local.py, alice, "8080"]
        """,
    )
    with request_loop(cluster, namespace) as loop:
        up = ups(alice)
        up.wait_for(r"^web\s+ready", timeout=300)
        answers(cluster, namespace, "x-dev-user: alice", "alice ")
        assert curl(cluster, namespace, "x-dev-user: alice") == "alice hello-from-the-pod"
        env = json.loads(tpconf(cluster, alice, "env", "web", "--format", "json"))
        assert env["TELEPRESENCE_CONTAINER"] == "main"
        assert curl(cluster, namespace).startswith("app web-")
        assert curl(cluster, namespace, "x-dev-user: bob").startswith("app web-")
        # A hot edit of the headers: no pod restarts, the new value routes at once.
        offset = len(up.output)
        write_config(
            alice,
            (alice / "telepresence.yaml")
            .read_text()
            .replace("x-dev-user: alice", 'x-dev-user: {regex: "al(ice|ex)"}'),
        )
        up.wait_for(r"~ web: routes", after=offset)
        up.wait_for(r"^web\s", after=offset)
        wait_until(
            lambda: curl(cluster, namespace, "x-dev-user: alex").startswith("alice"),
            60,
            "the edited headers to route",
        )
        assert replica_sets(cluster, namespace)[rs] == 0  # still intercepted, not re-rolled
        assert up.stop() == 0
        restored(cluster, namespace, before, rs)
    # Start (a rollout), an edit and stop (a Service switch and a rollout back): the team's
    # requests kept being answered, every one of them.
    assert len(loop.codes) > 50, loop.codes
    assert loop.failures == [], f"{len(loop.failures)} of {len(loop.codes)}: {loop.failures}"


def test_two_developers_intercept_one_deployment_with_their_own_headers(
    cluster: E2ECluster,
    namespace: str,
    team: str,
    tmp_path: Path,
    ups: Callable[[Path], Up],
) -> None:
    rs = team
    before = state(cluster, namespace)
    started = {}
    for name, port in (("alice", 8081), ("bob", 8082)):
        directory = project(
            tmp_path,
            name,
            namespace,
            f"""
            web:
              intercept: {{deployment: web, ports: ["{port}:8080"], headers: {{x-dev-user: {name}}}}}
              volumes: false
              run: [python3, local.py, {name}, "{port}"]
            """,
        )
        started[name] = ups(directory)
        started[name].wait_for(r"^web\s+ready", timeout=300)
        answers(cluster, namespace, f"x-dev-user: {name}", f"{name} ")
    assert curl(cluster, namespace, "x-dev-user: alice").startswith("alice ")
    assert curl(cluster, namespace, "x-dev-user: bob").startswith("bob ")
    assert curl(cluster, namespace).startswith("app ")
    # The first to leave takes only their own route; the intercept stays for the other.
    assert started["alice"].stop() == 0
    assert curl(cluster, namespace, "x-dev-user: bob").startswith("bob ")
    assert curl(cluster, namespace, "x-dev-user: alice").startswith("app ")
    assert state(cluster, namespace) != before
    # The last one restores.
    assert started["bob"].stop() == 0
    restored(cluster, namespace, before, rs)


def test_an_intercept_without_headers_takes_every_connection_and_down_restores_after_kill_9(
    cluster: E2ECluster,
    namespace: str,
    team: str,
    tmp_path: Path,
    ups: Callable[[Path], Up],
) -> None:
    rs = team
    before = state(cluster, namespace)
    directory = project(
        tmp_path,
        "solo",
        namespace,
        """
        web:
          intercept: web
          volumes: false
          run: [python3, local.py, solo, "8080"]
        """,
    )
    up = ups(directory)
    up.wait_for(r"^web\s+ready", timeout=300)
    answers(cluster, namespace, "x-any: 1", "solo ")
    for _ in range(4):  # both replicas, whatever the Service picks
        assert curl(cluster, namespace) == "solo hello-from-the-pod"
    up.kill()
    # A crashed developer's routes go with their connections: the team has the app back.
    wait_until(lambda: curl(cluster, namespace).startswith("app "), 60, "the app to answer again")
    status = run_tpconf(cluster, directory, "status")
    assert 'intercepted Deployment "web"' in status.stdout
    out = tpconf(cluster, directory, "down")
    assert 'restored Deployment "web"' in out
    restored(cluster, namespace, before, rs)


def test_to_pod_and_from_pod_reach_the_pods_own_localhost(
    cluster: E2ECluster, namespace: str, tmp_path: Path, ups: Callable[[Path], Up]
) -> None:
    """A sidecar database on the pod's localhost, reached from here; the pod reaches us back."""
    sidecar = container(
        "db",
        command=[
            "python3",
            "-m",
            "http.server",
            "5432",
            "--bind",
            "127.0.0.1",
            "--directory",
            "/etc",
        ],
    )
    deploy(cluster, namespace, web(replicas=1, sidecar=sidecar), web_service())
    directory = project(
        tmp_path,
        "links",
        namespace,
        """
        web:
          intercept: web
          volumes: false
          to-pod: [5432]
          from-pod: [9090]
          run: [python3, local.py, links, "9090"]
        """,
    )
    up = ups(directory)
    up.wait_for(r"^web\s+ready", timeout=300)
    up.wait_for(r"to-pod")
    # to-pod: localhost:5432 here is the db container's localhost:5432.
    listing = subprocess.run(
        ["curl", "-s", "--max-time", "10", "http://127.0.0.1:5432/"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert "hostname" in listing.stdout
    # from-pod: the app container reaches this machine's 9090 as its localhost:9090.
    fetch = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9090/').read().decode())"

    def from_pod() -> str:
        pods = json.loads(
            cluster.kubectl(
                "-n",
                namespace,
                "get",
                "pods",
                "-l",
                "app=web,tpconf.io/agent=intercept",
                "-o",
                "json",
            ).stdout
        )["items"]
        live = [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")]
        reply = cluster.kubectl(
            "-n", namespace, "exec", live[0], "-c", "main", "--", "python3", "-c", fetch, check=False
        )  # fmt: skip
        return reply.stdout.strip()

    wait_until(lambda: from_pod() == "links hello-from-the-pod", 60, "from-pod to answer")
    assert up.stop() == 0


def test_a_swapped_containers_ports_are_exposed_automatically(
    cluster: E2ECluster, namespace: str, tmp_path: Path, ups: Callable[[Path], Up]
) -> None:
    deploy(cluster, namespace, web(replicas=1), web_service())
    tools_pod(cluster, namespace)
    directory = project(
        tmp_path,
        "swapper",
        namespace,
        """
        web:
          swap: web
          volumes: false
          run: [python3, local.py, swapper, "8080"]
        """,
    )
    up = ups(directory)
    up.wait_for(r"^web\s+ready", timeout=300)
    assert "cluster port 8080 -> localhost:8080 (the swapped container's port)" in up.output
    answers(cluster, namespace, "x-any: 1", "swapper ")
    assert curl(cluster, namespace) == "swapper hello-from-the-pod"
    assert up.stop() == 0


def test_removing_the_entry_and_down_after_kill_9_take_nothing_from_the_team(
    cluster: E2ECluster,
    namespace: str,
    team: str,
    tmp_path: Path,
    ups: Callable[[Path], Up],
) -> None:
    """The other two ways an intercept ends, under a teammate's request loop: the entry removed
    from the file while `up` runs, and `tpconf down` after `up` was killed."""
    rs = team
    before = state(cluster, namespace)
    entry = """
        web:
          intercept: {deployment: web, headers: {x-dev-user: alice}}
          volumes: false
          run: [python3, local.py, alice, "8080"]
        """
    directory = project(tmp_path, "alice", namespace, entry)
    config = (directory / "telepresence.yaml").read_text()
    with request_loop(cluster, namespace) as loop:
        up = ups(directory)
        up.wait_for(r"^web\s+ready", timeout=300)
        answers(cluster, namespace, "x-dev-user: alice", "alice ")
        offset = len(up.output)
        write_config(directory, config.split("deployments:")[0] + "deployments: {}\n")
        up.wait_for(r"web\s+stopped \(removed from the file\)", timeout=120, after=offset)
        restored(cluster, namespace, before, rs)
        write_config(directory, config)
        up.wait_for(r"^web\s+ready", timeout=300, after=offset)
        answers(cluster, namespace, "x-dev-user: alice", "alice ")
        up.kill()
        wait_until(
            lambda: curl(cluster, namespace, "x-dev-user: alice").startswith("app "),
            60,
            "the crashed developer's route to go",
        )
        assert 'restored Deployment "web"' in tpconf(cluster, directory, "down")
        restored(cluster, namespace, before, rs)
    assert len(loop.codes) > 50, loop.codes
    assert loop.failures == [], f"{len(loop.failures)} of {len(loop.codes)}: {loop.failures}"
