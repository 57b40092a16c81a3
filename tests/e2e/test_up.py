"""`tpconf up` against the real cluster: the Telepresence docs' scenarios as telepresence.yaml.

Each test runs `tpconf up` as a child process in its own project folder and namespace; the local
commands write what they see into files there, and in-cluster pods act as clients of `expose`.
"""

from __future__ import annotations

import json
import re
import textwrap
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
    service,
    tools_pod,
    tpconf,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

ECHO_SERVER = (
    "import socket, threading\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 7777)); s.listen(64)\n"
    "def serve(c):\n"
    "    while (d := c.recv(65536)):\n"
    "        c.sendall(d)\n"
    "    c.close()\n"
    "while True:\n"
    "    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()\n"
)

# Talks to the in-cluster echo Service over ONE connection for as long as it runs, logging each
# round trip; a dropped connection is logged as "broken" and ends it.
ECHO_CLIENT = textwrap.dedent(
    """\
    import os, socket, sys, time
    open("b.pid", "a").write(f"{os.getpid()}\\n")
    c = socket.create_connection((sys.argv[1], 7777), timeout=10)
    n = 0
    while True:
        try:
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
        except Exception as exc:
            open("b.log", "a").write(f"broken {exc!r}\\n")
            raise
        n += 1
        open("b.log", "a").write(f"ok {n}\\n")
        time.sleep(0.2)
    """
)


def echo_service(cluster: E2ECluster, ns: str) -> None:
    deploy(
        cluster,
        ns,
        deployment("echo", TOOLS, command=["python3", "-c", ECHO_SERVER]),
        service("echo", [7777]),
    )


def swappable(cluster: E2ECluster, ns: str, name: str = "web", replicas: int = 2) -> None:
    """A Deployment with its own env, to be swapped."""
    env = {"MYENV": "hello-from-the-pod", "MULTILINE": "line one\nline two"}
    deploy(cluster, ns, deployment(name, NGINX, env=env, replicas=replicas))


def replicas(cluster: E2ECluster, ns: str, name: str) -> str:
    return cluster.kubectl(
        "-n", ns, "get", "deployment", name, "-o", "jsonpath={.spec.replicas}"
    ).stdout  # fmt: skip


def test_quickstart_process_reaches_services_by_every_name_and_gets_the_pod_env(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    ns = namespace
    helloworld(cluster, ns)
    script = (
        "curl -s http://helloworld/ > short.html; "
        f"curl -s http://helloworld.{ns}/ > ns.html; "
        f"curl -s http://helloworld.{ns}.svc.cluster.local/ > fqdn.html; "
        "env > env.tmp; mv env.tmp env.txt; "
        'cat "$TELEPRESENCE_ROOT/var/run/secrets/kubernetes.io/serviceaccount/namespace" > sa.tmp;'
        " mv sa.tmp sa.txt; "
        # A Service created after start: retried until it answers.
        "while ! curl -sf http://late/ > late.html; do sleep 0.5; done"
    )
    write_config(
        tmp_path,
        f"""\
version: 1
namespace: {ns}
deployments:
  quickstart:
    new: true
    method: inject-tcp
    env:
      set: {{FROM_THE_FILE: yes-it-is}}
    run: {script!r}
""",
    )
    up = Up(cluster, tmp_path).start()
    try:
        up.wait_for(r"quickstart ready")
        for page in ("short.html", "ns.html", "fqdn.html"):
            path = tmp_path / page
            wait_until(partial(lambda p: "Welcome to nginx!" in file_text(p), path), 60, page)
        # Files are written whole (renamed into place); sa.txt comes last before the loop.
        wait_until(lambda: (tmp_path / "sa.txt").exists(), 30, "the process to read the token dir")
        env = file_text(tmp_path / "env.txt")
        assert re.search(r"^KUBERNETES_SERVICE_HOST=\d", env, re.MULTILINE), env
        assert re.search(r"^HELLOWORLD_SERVICE_HOST=\d", env, re.MULTILINE), env
        assert "FROM_THE_FILE=yes-it-is" in env
        assert file_text(tmp_path / "sa.txt") == ns  # the new proxy's service-account volume
        assert re.search(r"^TELEPRESENCE_POD=quickstart-", env, re.MULTILINE), env
        helloworld(cluster, ns, name="late")
        wait_until(lambda: "Welcome to nginx!" in file_text(tmp_path / "late.html"), 90, "late")
        assert "exited with code 0" in up.wait_for(r"quickstart exited with code 0").group(0)
        status = tpconf(cluster, tmp_path, "status")
        assert "quickstart" in status and "inject-tcp" in status
        dotenv = tpconf(cluster, tmp_path, "env", "quickstart")
        assert re.search(r"^KUBERNETES_SERVICE_HOST='10\.", dotenv, re.MULTILINE), dotenv
        assert "FROM_THE_FILE='yes-it-is'" in dotenv
        as_json = json.loads(tpconf(cluster, tmp_path, "env", "quickstart", "--format", "json"))
        assert as_json["TELEPRESENCE_POD"].startswith("quickstart-")
    finally:
        assert up.stop() == 0, up.output[-3000:]
    assert "NotFound" in cluster.kubectl(
        "-n", ns, "get", "deployment", "quickstart", check=False
    ).stderr  # fmt: skip


def test_exposed_local_server_is_reachable_from_a_pod_through_the_service(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    ns = namespace
    tools_pod(cluster, ns)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "marker.txt").write_text("served from the laptop\n")
    write_config(
        tmp_path,
        f"""\
version: 1
namespace: {ns}
deployments:
  exposed:
    new: true
    expose: [8080, "8081:9000"]
    run: [python3, -m, http.server, "8080", --directory, www]
""",
    )
    up = Up(cluster, tmp_path).start()
    try:
        up.wait_for(r"exposed ready")

        def fetch(url: str) -> str:
            return cluster.kubectl(
                "-n", ns, "exec", "client", "--", "curl", "-s", "--max-time", "5", url, check=False
            ).stdout  # fmt: skip

        wait_until(
            lambda: fetch(f"http://exposed.{ns}:8080/marker.txt") == "served from the laptop\n",
            60,
            "the exposed port through the Service",
        )
        # 8081:9000 has no local server: the forward exists, the connection is refused locally.
        assert fetch(f"http://exposed.{ns}:9000/") == ""
    finally:
        assert up.stop() == 0, up.output[-3000:]


def test_swap_keeps_the_pods_env_and_restores_the_replicas(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    ns = namespace
    swappable(cluster, ns, replicas=2)
    write_config(
        tmp_path,
        f"""\
version: 1
namespace: {ns}
deployments:
  web:
    swap: true
    env:
      export: web.env
    run: env > env.tmp && mv env.tmp env.txt
""",
    )
    up = Up(cluster, tmp_path).start()
    try:
        up.wait_for(r"web ready")
        wait_until(lambda: "MYENV=" in file_text(tmp_path / "env.txt"), 30, "the process env")
        env = file_text(tmp_path / "env.txt")
        assert "MYENV=hello-from-the-pod" in env
        assert re.search(r"^KUBERNETES_SERVICE_HOST=\d", env, re.MULTILINE)
        exported = file_text(tmp_path / "web.env")
        assert "MULTILINE='line one\nline two'" in exported  # bash reads it back as it was
        assert (tmp_path / "web.env").stat().st_mode & 0o777 == 0o600
        assert replicas(cluster, ns, "web") == "0"
    finally:
        assert up.stop() == 0, up.output[-3000:]
    assert replicas(cluster, ns, "web") == "2"


def test_hot_reload_changes_only_what_changed(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    ns = namespace
    echo_service(cluster, ns)
    swappable(cluster, ns, name="web", replicas=3)
    (tmp_path / "echo_client.py").write_text(ECHO_CLIENT)

    def config(a_version: str, *, with_c: bool, broken: bool = False) -> str:
        text = f"""\
version: 1
namespace: {ns}
deployments:
  a:
    new: true
    run: sh -c 'echo "$$$$ {a_version}" >> a.pids; exec sleep 3600'
  b:
    new: true
    run: [python3, echo_client.py, echo.{ns}]
"""
        if with_c:
            text += "  c:\n    swap: web\n    run: env > c.env\n"
        if broken:
            text += "  d:\n    new: true\n    expose: [99999]\n"
        return text

    write_config(tmp_path, config("v1", with_c=False))
    up = Up(cluster, tmp_path).start()
    try:
        up.wait_for(r"^a ready")
        up.wait_for(r"^b ready")
        wait_until(lambda: "v1" in file_text(tmp_path / "a.pids"), 30, "a's first process")
        wait_until(lambda: "ok 3" in file_text(tmp_path / "b.log"), 30, "b's connection")

        def b_count() -> int:
            return len(re.findall(r"^ok ", file_text(tmp_path / "b.log"), re.MULTILINE))

        # 1. `run` of a changes: a's process restarts, b is not touched.
        mark = len(up.output)
        write_config(tmp_path, config("v2", with_c=False))
        wait_until(lambda: "v2" in file_text(tmp_path / "a.pids"), 30, "a restarted with v2")
        assert re.findall(r"^[-+~] (\w+): (\w+)", up.output[mark:], re.MULTILINE) == [
            ("a", "process"),
            ("a", "process"),
        ]
        before = b_count()
        wait_until(lambda: b_count() > before + 5, 30, "b's connection to keep working")

        # 2. A deployment is added (a swap of `web`).
        write_config(tmp_path, config("v2", with_c=True))
        up.wait_for(r"^c ready", after=mark)
        wait_until(lambda: "HOSTNAME" not in file_text(tmp_path / "c.env") and
                   "KUBERNETES" in file_text(tmp_path / "c.env"), 30, "c's process")  # fmt: skip
        assert replicas(cluster, ns, "web") == "0"

        # 3. It is removed again: the swap is restored.
        mark = len(up.output)
        write_config(tmp_path, config("v2", with_c=False))
        up.wait_for(r"^c stopped \(removed from the file\)", after=mark)
        assert replicas(cluster, ns, "web") == "3"

        # 4. A broken edit: the error with its position, and the old state keeps running.
        mark = len(up.output)
        write_config(tmp_path, config("v2", with_c=False, broken=True))
        up.wait_for(r"telepresence\.yaml:\d+:\d+: deployments\.d\.expose\[0\]", after=mark)
        up.wait_for(r"the last good configuration keeps running", after=mark)
        before = b_count()
        wait_until(lambda: b_count() > before + 5, 30, "b to keep working after a broken edit")
        assert "broken" not in file_text(tmp_path / "b.log")
        assert len(file_text(tmp_path / "b.pid").split()) == 1, "b must never restart"
        assert file_text(tmp_path / "a.pids").count("v2") == 1
    finally:
        assert up.stop() == 0, up.output[-3000:]
    assert replicas(cluster, ns, "web") == "3"


def test_down_after_kill_9_restores_the_swap_and_removes_the_proxy(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    ns = namespace
    swappable(cluster, ns, name="web", replicas=2)
    write_config(
        tmp_path,
        f"""\
version: 1
namespace: {ns}
deployments:
  web:
    swap: true
  extra:
    new: true
    expose: [8080]
""",
    )
    up = Up(cluster, tmp_path).start()
    up.wait_for(r"^web ready")
    up.wait_for(r"^extra ready")
    assert replicas(cluster, ns, "web") == "0"
    up.kill()  # SIGKILL: nothing of tpconf's own cleanup runs

    status = run_tpconf(cluster, tmp_path, "status")
    assert status.returncode == 1
    assert "ended without cleaning up" in status.stdout and "tpconf down" in status.stdout
    assert f'swapped Deployment "web" in namespace "{ns}"' in status.stdout, status.stdout
    assert f'Deployment "extra" in namespace "{ns}"' in status.stdout
    # The file is broken by now (or the deployment gone from it): down still knows the namespace
    # from the crashed session's state.
    write_config(tmp_path, "version: 1\ndeployments: [oops\n")
    out = tpconf(cluster, tmp_path, "down")
    assert "restored" in out and "deleted" in out, out
    assert replicas(cluster, ns, "web") == "2"
    left = cluster.kubectl(
        "-n", ns, "get", "deployments,services,secrets", "-l", "app.kubernetes.io/managed-by=tpconf",
        "-o", "name",
    ).stdout  # fmt: skip
    assert left == ""
    # Idempotent: a second run finds nothing (and now needs the file again: the state is gone).
    write_config(tmp_path, f"version: 1\nnamespace: {ns}\ndeployments:\n  web: {{swap: true}}\n")
    assert "nothing to clean up" in tpconf(cluster, tmp_path, "down")


def test_shell_true_opens_an_interactive_shell_with_the_pod_env(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    import os
    import pty
    import select
    import subprocess
    import time

    from tests.e2e.harness import TPCONF, tpconf_env

    ns = namespace
    helloworld(cluster, ns)
    write_config(
        tmp_path,
        f"version: 1\nnamespace: {ns}\ndeployments:\n  dev:\n    new: true\n    shell: true\n",
    )
    env = tpconf_env(cluster)
    env["SHELL"] = "/bin/bash"
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [*TPCONF, "up"], cwd=tmp_path, env=env, stdin=child, stdout=child, stderr=child,
        start_new_session=True,
    )  # fmt: skip
    os.close(child)
    seen = b""

    def read_until(marker: bytes, timeout: float) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < deadline, (
                f"no {marker!r} in:\n{seen.decode(errors='replace')}"
            )
            ready, _, _ = select.select([main], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(main, 65536)
                except OSError:
                    break

    try:
        read_until(b"[tpconf:dev]", 120)
        os.write(
            main, b"curl -s http://helloworld/ > page.html; echo $KUBERNETES_SERVICE_HOST > k.txt\n"
        )
        wait_until(lambda: (tmp_path / "k.txt").exists(), 30, "the shell to run the command")
        os.write(main, b"exit\n")
        read_until(b"shell exited; stopping", 30)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    assert "Welcome to nginx!" in file_text(tmp_path / "page.html")
    assert file_text(tmp_path / "k.txt").strip().startswith("10.")
