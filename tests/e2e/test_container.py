"""`method: container` against the real cluster and the machine's Docker engine.

The app container runs with no network of its own: whatever it reaches, it reaches through
tpconf and the proxy pod. Each test checks what the process sees from inside the container
(files it writes into a bind-mounted folder of the test), what the cluster sees of it (a pod
calling the exposed port), and what is left in Docker afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import E2ECluster
from tests.e2e.harness import (
    NGINX,
    TOOLS,
    Up,
    deploy,
    deployment,
    file_text,
    helloworld,
    run_tpconf,
    tools_pod,
    tpconf,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]

REPO = Path(__file__).resolve().parents[2]

# A static Go program (CGO_ENABLED=0: its own resolver and syscalls, nothing torsocks could
# wrap) that fetches a URL and prints the status and the page's title.
PROBE = textwrap.dedent(
    """\
    package main

    import (
    \t"fmt"
    \t"io"
    \t"net/http"
    \t"os"
    \t"regexp"
    )

    func main() {
    \tresp, err := http.Get(os.Args[1])
    \tif err != nil {
    \t\tfmt.Println("probe error:", err)
    \t\tos.Exit(1)
    \t}
    \tbody, _ := io.ReadAll(resp.Body)
    \ttitle := regexp.MustCompile(`<title>(.*)</title>`).FindSubmatch(body)
    \tif title == nil {
    \t\tfmt.Println("probe status", resp.StatusCode, "no title")
    \t\treturn
    \t}
    \tfmt.Printf("probe status %d title %s\\n", resp.StatusCode, title[1])
    }
    """
)


@pytest.fixture(scope="module")
def docker() -> str:
    """The Docker engine the project's scripts start (the agent image is built with it)."""
    subprocess.run(
        ["bash", "-c", ". tests/cluster/images/lib.sh && ensure_dockerd"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    path = shutil.which("docker")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The static probe, built once."""
    src = tmp_path_factory.mktemp("probe")
    (src / "go.mod").write_text("module probe\n\ngo 1.21\n")
    (src / "main.go").write_text(PROBE)
    go = shutil.which("go") or "/usr/local/go/bin/go"
    env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    subprocess.run(
        [go, "build", "-trimpath", "-o", "probe", "."], cwd=src, env=env, check=True, timeout=300
    )
    binary = src / "probe"
    linked = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in linked.stdout + linked.stderr  # torsocks cannot wrap it
    return binary


def containers(docker: str, *labels: str) -> list[dict[str, str]]:
    """Containers carrying all ``labels`` (``KEY=VALUE``), with their id, name and labels."""
    filters = [arg for label in labels for arg in ("--filter", f"label={label}")]
    out = subprocess.run(
        [docker, "ps", "--all", "--no-trunc", *filters, "--format", "{{json .}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def project_containers(docker: str, tmp_path: Path) -> Iterator[None]:
    """Whatever a failed test leaves in Docker goes (the check itself is in each test)."""
    yield
    for found in containers(docker, "tpconf.io/managed=true"):
        if "tpconf.io/project" in found.get("Labels", ""):
            subprocess.run([docker, "rm", "-f", found["ID"]], capture_output=True, check=False)


APP_SCRIPT = """\
set -u
curl -s http://helloworld/ > /out/short.html
curl -s http://helloworld.{ns}/ > /out/ns.html
curl -s http://helloworld.{ns}.svc.cluster.local/ > /out/fqdn.html
env > /out/env.tmp && mv /out/env.tmp /out/env.txt
cat /var/run/secrets/kubernetes.io/serviceaccount/namespace > /out/sa-real.txt
cat "$TELEPRESENCE_ROOT/var/run/secrets/kubernetes.io/serviceaccount/namespace" > /out/sa-root.txt
(while ! curl -sf http://late/ > /out/late.tmp; do sleep 0.5; done; mv /out/late.tmp /out/late.html) &
echo {version} > /out/www/version.txt
exec python3 -m http.server 8080 --directory /out/www
"""


def entry(name: str, **settings: object) -> str:
    """A `method: container` deployment of the tools image (`new` unless ``settings`` name
    another operation); ``settings`` as JSON values."""
    operation = [] if {"swap", "intercept", "existing"} & set(settings) else ["    new: true"]
    lines = [f"  {name}:", *operation, "    method: container", f"    image: {TOOLS}"]
    lines += [
        f"    {key.replace('_', '-')}: {json.dumps(value)}" for key, value in settings.items()
    ]
    return "\n".join(lines) + "\n"


def config(ns: str, *entries: str) -> str:
    return f"version: 1\nnamespace: {ns}\ndeployments:\n" + "".join(entries)


def seed_config(ns: str, out: Path, probe: Path, *, version: str) -> str:
    script = APP_SCRIPT.format(ns=ns, version=version)
    app = entry(
        "app",
        container_args=["--volume", f"{out}:/out"],
        expose=[8080],
        env={"set": {"FROM_THE_FILE": "yes-it-is"}},
        run=["bash", "-c", script],
    )
    static = entry(
        "static",
        volumes=False,
        container_args=["--volume", f"{probe}:/probe:ro"],
        run=["/probe", "http://helloworld/"],
    )
    web = entry(
        "web",
        swap=True,
        volumes=False,
        container_args=["--volume", f"{out}:/out"],
        run=["sh", "-c", "env > /out/web.tmp && mv /out/web.tmp /out/web.env; exec sleep 3600"],
    )
    return config(ns, app, static, web)


def test_the_container_lives_on_the_cluster_network_and_reloads_only_the_app(
    cluster: E2ECluster,
    namespace: str,
    tmp_path: Path,
    docker: str,
    probe: Path,
    project_containers: None,
) -> None:
    ns = namespace
    helloworld(cluster, ns)
    tools_pod(cluster, ns)
    # A Deployment to swap whose env has what changes how programs start: withheld from a
    # process on this machine, but the container runs the pod's own kind of image.
    web_vars = {"MYENV": "hello-from-the-pod", "NODE_OPTIONS": "--max-old-space-size=64"}
    deploy(cluster, ns, deployment("web", NGINX, env=web_vars, ports=[80]))
    out = tmp_path / "out"
    (out / "www").mkdir(parents=True)
    (out / "www" / "marker.txt").write_text("served from the container\n")
    write_config(tmp_path, seed_config(ns, out, probe, version="v1"))
    up = Up(cluster, tmp_path).start()
    try:
        up.wait_for(r"^app ready")
        up.wait_for(r"^static ready")
        up.wait_for(r"^web ready")
        # Services by their three names, from a process with no network but the cluster's.
        for page in ("short.html", "ns.html", "fqdn.html"):
            path = out / page
            wait_until(partial(lambda p: "Welcome to nginx!" in file_text(p), path), 60, page)
        wait_until(lambda: (out / "env.txt").exists(), 30, "the app's environment")
        env = file_text(out / "env.txt")
        assert re.search(r"^KUBERNETES_SERVICE_HOST=\d", env, re.MULTILINE), env
        assert re.search(r"^HELLOWORLD_SERVICE_HOST=\d", env, re.MULTILINE), env
        assert "FROM_THE_FILE=yes-it-is" in env
        assert re.search(r"^TELEPRESENCE_POD=app-", env, re.MULTILINE), env
        # Only the pod's environment: nothing of this machine's (tpconf's own PATH, HOME...).
        assert "KUBECONFIG=" not in env and "TPCONF_KUBECTL" not in env, env
        # The pod's volumes at their real paths, and under TELEPRESENCE_ROOT.
        wait_until(lambda: file_text(out / "sa-root.txt") == ns, 30, "the volume under the root")
        assert file_text(out / "sa-real.txt") == ns
        # The swapped Deployment's env, all of it.
        wait_until(lambda: (out / "web.env").exists(), 60, "the swapped container's env")
        web_env = file_text(out / "web.env")
        assert "MYENV=hello-from-the-pod" in web_env, web_env
        assert "NODE_OPTIONS=--max-old-space-size=64" in web_env, web_env
        # The static Go binary reached the Service (torsocks cannot wrap it).
        up.wait_for(r"static\s*\| probe status 200 title Welcome to nginx!")

        # `expose`: a pod reaches the app container's server through the Service...
        def fetch(url: str) -> str:
            return cluster.kubectl(
                "-n", ns, "exec", "client", "--", "curl", "-s", "--max-time", "5", url, check=False
            ).stdout  # fmt: skip

        wait_until(
            lambda: fetch(f"http://app.{ns}:8080/marker.txt") == "served from the container\n",
            60,
            "the exposed port through the Service",
        )
        # ...and this machine reaches it on loopback, as with `docker run -p 127.0.0.1:...`.
        local = subprocess.run(
            ["curl", "-s", "--max-time", "5", "http://127.0.0.1:8080/version.txt"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert local.stdout == "v1\n"
        # A Service created after start.
        helloworld(cluster, ns, name="late")
        wait_until(lambda: "Welcome to nginx!" in file_text(out / "late.html"), 90, "late")

        status = tpconf(cluster, tmp_path, "status")
        assert "container" in status and "network container" in status, status
        networks = containers(docker, "tpconf.io/deployment=app", "tpconf.io/role=network")
        apps = containers(docker, "tpconf.io/deployment=app", "tpconf.io/role=app")
        assert len(networks) == 1 and len(apps) == 1, (networks, apps)
        pod_before = tpconf_status_json(cluster, tmp_path)["app"]

        # Hot reload: a new `run` restarts the app container only.
        (out / "late.html").unlink()
        mark = len(up.output)
        write_config(tmp_path, seed_config(ns, out, probe, version="v2"))
        up.wait_for(r"^- app: process \(changed\)", after=mark)
        wait_until(lambda: fetch(f"http://app.{ns}:8080/version.txt") == "v2\n", 60, "v2")
        networks_after = containers(docker, "tpconf.io/deployment=app", "tpconf.io/role=network")
        assert [c["ID"] for c in networks_after] == [c["ID"] for c in networks]
        apps_after = containers(docker, "tpconf.io/deployment=app", "tpconf.io/role=app")
        assert len(apps_after) == 1 and apps_after[0]["ID"] != apps[0]["ID"]
        assert tpconf_status_json(cluster, tmp_path)["app"] == pod_before  # same proxy pod
        changed = re.findall(r"^[-+~] \S+: \S+", up.output[mark:], re.MULTILINE)
        assert set(changed) == {"- app: process", "+ app: process"}, changed
    finally:
        assert up.stop() == 0, up.output[-3000:]
    # Ctrl-C leaves nothing in Docker.
    assert containers(docker, "tpconf.io/managed=true", "tpconf.io/deployment=app") == []
    assert containers(docker, "tpconf.io/managed=true", "tpconf.io/deployment=static") == []
    assert containers(docker, "tpconf.io/managed=true", "tpconf.io/deployment=web") == []


def tpconf_status_json(cluster: E2ECluster, project: Path) -> dict[str, str]:
    """Each deployment's proxy pod, from `tpconf status --json`."""
    rows = json.loads(tpconf(cluster, project, "status", "--json"))["deployments"]
    return {row["name"]: row.get("pod") for row in rows}


def test_down_after_kill_9_removes_the_containers(
    cluster: E2ECluster,
    namespace: str,
    tmp_path: Path,
    docker: str,
    project_containers: None,
) -> None:
    """Everything of tpconf killed at once (up, its janitor, the docker commands): the engine
    keeps the containers running, and `tpconf down` removes them."""
    ns = namespace
    write_config(tmp_path, config(ns, entry("app", volumes=False, run=["sleep", "3600"])))
    up = Up(cluster, tmp_path).start()
    try:
        up.wait_for(r"^app ready")
        # Ready once `docker run` is started; the engine creates the app container meanwhile.
        wait_until(partial(both_running, docker), 30, "both containers running")
        assert up.process is not None
        killed = descendants(up.process.pid) + [up.process.pid] + janitors(tmp_path)
        for pid in killed:
            with _gone():
                os.kill(pid, signal.SIGKILL)
        up.process.wait()
    finally:
        if up.process is not None and up.process.poll() is None:
            up.kill()
    assert both_running(docker), containers(docker, "tpconf.io/deployment=app")
    down = run_tpconf(cluster, tmp_path, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "removed the network container tpconf-" in down.stdout, down.stdout
    assert re.search(r"^removed the app container \S+ of app$", down.stdout, re.MULTILINE)
    assert containers(docker, "tpconf.io/deployment=app") == []
    assert "NotFound" in cluster.kubectl("-n", ns, "get", "deployment", "app", check=False).stderr


def test_a_killed_up_leaves_no_container_running(
    cluster: E2ECluster,
    namespace: str,
    tmp_path: Path,
    docker: str,
    project_containers: None,
) -> None:
    """kill -9 of `up` alone: the docker commands get SIGTERM from the kernel (and from the
    janitor), pass it on, and both containers stop and are removed without `tpconf down`."""
    write_config(tmp_path, config(namespace, entry("app", volumes=False, run=["sleep", "3600"])))
    up = Up(cluster, tmp_path).start()
    try:
        up.wait_for(r"^app ready")
        # Ready once `docker run` is started; the engine creates the app container meanwhile.
        wait_until(partial(both_running, docker), 30, "both containers running")
    finally:
        up.kill()
    wait_until(
        lambda: containers(docker, "tpconf.io/deployment=app") == [], 30, "the containers to go"
    )


def both_running(docker: str) -> bool:
    """The network container and the app container of ``app`` both run."""
    found = containers(docker, "tpconf.io/deployment=app")
    return len(found) == 2 and all(c["State"] == "running" for c in found)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    children = subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True
    ).stdout
    parent_of = {int(p): int(pp) for p, pp in (line.split() for line in children.splitlines())}
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, pp in parent_of.items() if pp == current]
        found += kids
        frontier += kids
    return found


def janitors(project: Path) -> list[int]:
    """The janitor beside ``up`` (it leaves up's tree at start: its own session)."""
    found = subprocess.run(
        ["pgrep", "-f", f"tpconf.pids janitor {project}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [int(pid) for pid in found.split()]


class _gone:
    """Ignore a process that already exited."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is ProcessLookupError
