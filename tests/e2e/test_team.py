"""Daily use for a team (issue 13), against the real cluster: subsets and profiles, personal
overrides with `.env`, cluster selection (a KUBECONFIG list, `--namespace`, `allowed-contexts`),
`tpconf exec` on a pipe and on a terminal, restarts, scripted runs, retries of an image that is
not loaded yet, `status --json`, `logs`, and `init`.

Every `tpconf up` a test starts is stopped by the ``ups`` fixture, whatever the test asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.conftest import E2ECluster
from tests.e2e.harness import (
    NGINX,
    TPCONF,
    Up,
    deploy,
    deployment,
    file_text,
    helloworld,
    run_tpconf,
    tpconf,
    tpconf_env,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


class TeamUp(Up):
    """An :class:`Up` with its own arguments' environment (a KUBECONFIG list, say)."""

    def __init__(
        self, cluster: E2ECluster, project: Path, env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(cluster, project)
        self.env = dict(env) if env is not None else tpconf_env(cluster)

    def start(self, *args: str) -> TeamUp:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*TPCONF, "up", *args],
            cwd=self.project,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def exit_code(self, timeout: float) -> int:
        """Wait for it to end by itself."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"tpconf up did not end by itself:\n{self.output[-3000:]}"
            ) from None


@pytest.fixture
def ups(cluster: E2ECluster) -> Iterator[Callable[..., TeamUp]]:
    """Starts `tpconf up`s; every one still running at the end is stopped (killed if stuck)."""
    started: list[TeamUp] = []

    def start(project: Path, *args: str, env: Mapping[str, str] | None = None) -> TeamUp:
        up = TeamUp(cluster, project, env).start(*args)
        started.append(up)
        return up

    yield start
    for up in started:
        if up.process is not None and up.process.poll() is None:
            with contextlib.suppress(AssertionError):
                up.stop(timeout=120)
            if up.process.poll() is None:
                up.kill()


def config(project: Path, namespace: str, deployments: str) -> None:
    """telepresence.yaml of ``deployments`` (YAML at column 0) in ``namespace``."""
    body = textwrap.indent(textwrap.dedent(deployments), "  ")
    write_config(project, f"version: 1\nnamespace: {namespace}\ndeployments:\n{body}")


def deployments_in(cluster: E2ECluster, ns: str) -> set[str]:
    out = cluster.kubectl("-n", ns, "get", "deployments", "-o", "name").stdout
    return {line.removeprefix("deployment.apps/") for line in out.split()}


def status_json(cluster: E2ECluster, project: Path, *names: str) -> dict[str, object]:
    proc = run_tpconf(cluster, project, "status", "--json", *names)
    data = json.loads(proc.stdout)
    assert isinstance(data, dict), proc.stdout
    return data


def rows(data: dict[str, object]) -> list[dict[str, object]]:
    found = data["deployments"]
    assert isinstance(found, list)
    return found


# ---- 1. subsets and profiles -------------------------------------------------------------------


def test_up_and_down_of_some_deployments_profiles_and_status_json(
    cluster: E2ECluster, namespace: str, tmp_path: Path, ups: Callable[..., TeamUp]
) -> None:
    ns = namespace
    config(
        tmp_path,
        ns,
        """\
a:
  new: true
  run: echo a-up > a.txt; exec sleep 600
b:
  new: true
  run: echo b-up > b.txt; exec sleep 600
c:
  new: true
  profiles: [extra]
  run: echo c-up > c.txt; exec sleep 600
""",
    )
    assert tpconf(cluster, tmp_path, "config", "--services").split() == ["a", "b"]
    with_extra = tpconf(cluster, tmp_path, "config", "--services", "--profile", "extra")
    assert with_extra.split() == ["a", "b", "c"]

    up = ups(tmp_path, "a")
    up.wait_for(r"^a ready")
    wait_until(lambda: file_text(tmp_path / "a.txt") == "a-up\n", 30, "a's command")
    data = status_json(cluster, tmp_path)
    assert data["up"] == "running"
    assert [row["name"] for row in rows(data)] == ["a"]
    assert deployments_in(cluster, ns) == {"a"}

    # A second `up NAME` hands the name to the running one, which starts it.
    started = run_tpconf(cluster, tmp_path, "up", "b")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "started b in the running tpconf up" in started.stdout
    wait_until(lambda: file_text(tmp_path / "b.txt") == "b-up\n", 30, "b's command")
    assert [row["name"] for row in rows(status_json(cluster, tmp_path))] == ["a", "b"]
    assert [row["name"] for row in rows(status_json(cluster, tmp_path, "b"))] == ["b"]

    # `down NAME` while up runs: that one stops (its proxy is deleted), the other runs on.
    stopped = run_tpconf(cluster, tmp_path, "down", "a")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped a in the running tpconf up" in stopped.stdout
    wait_until(lambda: deployments_in(cluster, ns) == {"b"}, 60, "a's proxy to be deleted")
    assert [row["name"] for row in rows(status_json(cluster, tmp_path))] == ["b"]
    unknown = run_tpconf(cluster, tmp_path, "status", "c")
    assert unknown.returncode == 1
    assert "tpconf up runs no deployment c" in unknown.stderr
    assert up.stop() == 0, up.output[-3000:]
    assert deployments_in(cluster, ns) == set()
    assert not (tmp_path / "c.txt").exists()


def test_down_of_some_deployments_after_a_crash_cleans_only_theirs(
    cluster: E2ECluster, namespace: str, tmp_path: Path, ups: Callable[..., TeamUp]
) -> None:
    ns = namespace
    config(tmp_path, ns, "a: {new: true}\nb: {new: true}\n")
    up = ups(tmp_path)
    up.wait_for(r"^a ready")
    up.wait_for(r"^b ready")
    up.kill()  # kill -9: both proxies stay
    assert deployments_in(cluster, ns) == {"a", "b"}
    out = tpconf(cluster, tmp_path, "down", "a")
    assert f'deleted Deployment "a" in namespace "{ns}"' in out, out
    assert 'Deployment "b"' not in out, out
    assert deployments_in(cluster, ns) == {"b"}
    tpconf(cluster, tmp_path, "down")
    assert deployments_in(cluster, ns) == set()


# ---- 2. overrides, .env, cluster selection -------------------------------------------------------


def test_overrides_dotenv_a_kubeconfig_list_the_namespace_flag_and_allowed_contexts(
    cluster: E2ECluster, namespace: str, tmp_path: Path, ups: Callable[..., TeamUp]
) -> None:
    ns = namespace
    helloworld(cluster, ns)
    write_config(
        tmp_path,
        """\
version: 1
namespace: somebody-elses
allowed-contexts: [team-ctx]
deployments:
  api:
    new: true
    run: echo committed > out.txt
""",
    )
    (tmp_path / "telepresence.override.yaml").write_text(
        "deployments:\n  api:\n    run: curl -s http://helloworld/ | grep -q Welcome && echo reached > out.txt;"
        ' echo "$GREETING" >> out.txt\n    env: {set: {GREETING: "${GREETING:?set it in .env}"}}\n'
    )
    (tmp_path / ".env").write_text("GREETING='hello from .env'\n")

    # Only the kubeconfig's current context: not allowed, refused before anything is changed.
    refused = run_tpconf(cluster, tmp_path, "up", "-n", ns)
    assert refused.returncode == 1
    assert "context tpconf-local is not in `allowed-contexts`" in refused.stderr
    assert "nothing was changed" in refused.stderr
    assert deployments_in(cluster, ns) == {"helloworld"}

    # KUBECONFIG as a list, as kubectl reads it: a missing file is skipped, the first
    # current-context wins (the client library alone would take the last one's).
    mine = tmp_path / "mine.kubeconfig"
    mine.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: team-ctx\ncontexts:\n"
        "- name: team-ctx\n  context: {cluster: tpconf-local, user: admin}\n"
    )
    env = tpconf_env(cluster)
    env["KUBECONFIG"] = os.pathsep.join([str(tmp_path / "missing"), str(mine), cluster.kubeconfig])
    up = ups(tmp_path, "-n", ns, env=env)
    using = up.wait_for(r"^using context team-ctx \(https://[^)]+\), namespace (\S+)")
    assert using.group(1) == ns
    ready = up.wait_for(r"^api ready")
    assert using.start() < ready.start()  # said before anything changed
    wait_until(lambda: file_text(tmp_path / "out.txt").count("\n") == 2, 60, "the command")
    assert file_text(tmp_path / "out.txt") == "reached\nhello from .env\n"
    shown = run_tpconf(cluster, tmp_path, "config", "-n", ns)
    assert f"namespace: {ns}" in shown.stdout
    assert "GREETING: hello from .env" in shown.stdout
    # .env is followed like the file: the command runs again with the new value.
    (tmp_path / ".env").write_text("GREETING='changed in .env'\n")
    wait_until(
        lambda: file_text(tmp_path / "out.txt") == "reached\nchanged in .env\n", 60, "the edit"
    )
    assert up.stop() == 0, up.output[-3000:]
    flag = run_tpconf(cluster, tmp_path, "up", "--context", "tpconf-local", "-n", ns)
    assert flag.returncode == 2
    assert flag.stderr.startswith(
        "--context: context: context `tpconf-local` is not in `allowed-contexts` (team-ctx)"
    )


# ---- 4. exec -----------------------------------------------------------------------------------

# Makes the pty on its stdin its controlling terminal (a new session), then runs argv[1:]:
# Ctrl-C on the terminal then reaches the command, as in a real one.
ON_A_TERMINAL = (
    "import os, sys\n"
    "os.setsid()\n"
    "os.close(os.open(os.ttyname(0), os.O_RDWR))\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def read_until(fd: int, pattern: str, seen: list[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = b"".join(seen).decode(errors="replace")
        if re.search(pattern, text):
            return text
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {pattern!r}; got:\n{text[-2000:]}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            try:
                seen.append(os.read(fd, 65536))
            except OSError:  # the other side closed
                raise AssertionError(f"terminal closed before {pattern!r}:\n{text}") from None


def test_exec_runs_a_command_as_the_deployment_on_a_pipe_and_on_a_terminal(
    cluster: E2ECluster, namespace: str, tmp_path: Path, ups: Callable[..., TeamUp]
) -> None:
    ns = namespace
    helloworld(cluster, ns)
    config(
        tmp_path,
        ns,
        """\
api:
  new: true
  env:
    set: {FROM_THE_FILE: yes}
""",
    )
    up = ups(tmp_path)
    up.wait_for(r"^api ready")

    # From an IDE or a script: stdin and stdout are pipes, the exit code comes back.
    script = (
        'read line; echo "stdin: $line"; echo "file: $FROM_THE_FILE";'
        " curl -s http://helloworld/ | grep -q Welcome && echo reached; exit 3"
    )
    piped = subprocess.run(
        [*TPCONF, "exec", "api", "--", "sh", "-c", script],
        cwd=tmp_path,
        env=tpconf_env(cluster),
        input="from the pipe\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert piped.returncode == 3, piped.stdout + piped.stderr
    assert piped.stdout == "stdin: from the pipe\nfile: yes\nreached\n"

    # On a terminal: it is the command's, and Ctrl-C reaches the command.
    main, child = os.openpty()
    try:
        on_tty = (
            "test -t 0 && echo on-a-tty; trap 'echo interrupted; exit 9' INT;"
            " read x; echo got-$x; while :; do sleep 1; done"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", ON_A_TERMINAL, *TPCONF, "exec", "api", "--", "sh", "-c", on_tty],
            cwd=tmp_path,
            env=tpconf_env(cluster),
            stdin=child,
            stdout=child,
            stderr=child,
        )
        os.close(child)
        seen: list[bytes] = []
        try:
            read_until(main, r"on-a-tty", seen, 60)
            os.write(main, b"typed\n")
            read_until(main, r"got-typed", seen, 30)
            os.write(main, b"\x03")  # Ctrl-C
            read_until(main, r"interrupted", seen, 30)
            assert proc.wait(30) == 9
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.close(main)
    missing = run_tpconf(cluster, tmp_path, "exec", "nope", "--", "true")
    assert missing.returncode == 1
    assert "deployment nope is not running (running: api)" in missing.stderr
    assert up.stop() == 0, up.output[-3000:]


# ---- 5. failures ---------------------------------------------------------------------------------


def test_restart_on_failure_and_the_logs_of_up(
    cluster: E2ECluster, namespace: str, tmp_path: Path, ups: Callable[..., TeamUp]
) -> None:
    ns = namespace
    config(
        tmp_path,
        ns,
        """\
flaky:
  new: true
  restart: on-failure
  run: echo "attempt $$(( $$(cat n 2>/dev/null || echo 0) + 1 ))" | tee -a runs.txt;
    echo $$(( $$(cat n 2>/dev/null || echo 0) + 1 )) > n; [ "$$(cat n)" -ge 3 ]
""",
    )
    up = ups(tmp_path)
    up.wait_for(r"^flaky exited with code 0")
    assert file_text(tmp_path / "runs.txt") == "attempt 1\nattempt 2\nattempt 3\n"
    up.wait_for(r"^flaky restarting in 0\.5s \(restart: on-failure, #1\)", 1)
    up.wait_for(r"^flaky restarting in 1s \(restart: on-failure, #2\)", 1)
    row = rows(status_json(cluster, tmp_path))[0]
    assert row["process"] == "exited with code 0, restarted 2x"

    logs = tpconf(cluster, tmp_path, "logs", "flaky")
    lines = logs.splitlines()
    assert [line for line in lines if line.startswith("flaky | ")] == [
        "flaky | attempt 1",
        "flaky | attempt 2",
        "flaky | attempt 3",
    ]
    assert "flaky exited with code 1" in lines
    assert tpconf(cluster, tmp_path, "logs", "--tail", "1", "flaky") == "flaky exited with code 0\n"

    follow = subprocess.Popen(
        [*TPCONF, "logs", "-f", "--tail", "0"],
        cwd=tmp_path,
        env=tpconf_env(cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        assert follow.poll() is None  # follows while up runs
        assert up.stop() == 0, up.output[-3000:]
        out, err = follow.communicate(timeout=30)  # and ends with it
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 0, err
    assert "attempt" not in out  # --tail 0: only what came after it started (the teardown)


def test_a_scripted_run_exits_with_the_code_of_its_tests_and_cleans_up(
    cluster: E2ECluster, namespace: str, tmp_path: Path, ups: Callable[..., TeamUp]
) -> None:
    ns = namespace
    helloworld(cluster, ns)
    config(
        tmp_path,
        ns,
        """\
server:
  new: true
  run: exec sleep 600
tests:
  new: true
  run: curl -sf http://helloworld/ > page.html && exit 7
""",
    )
    up = ups(tmp_path, "--exit-code-from", "tests", "--no-watch")
    assert up.exit_code(300) == 7, up.output[-3000:]
    assert "Welcome to nginx!" in file_text(tmp_path / "page.html")
    assert deployments_in(cluster, ns) == {"helloworld"}  # torn down


def test_up_exits_non_zero_when_every_deployment_failed(
    cluster: E2ECluster, namespace: str, tmp_path: Path, ups: Callable[..., TeamUp]
) -> None:
    write_config(
        tmp_path,
        f"version: 1\nnamespace: {namespace}\ndeployments:\n  web:\n    swap: no-such-deployment\n",
    )
    up = ups(tmp_path, "--no-watch")
    assert up.exit_code(120) == 1, up.output[-3000:]
    assert "nothing could start" in up.output


def test_an_image_that_is_not_loaded_yet_is_retried_until_it_is(
    cluster: E2ECluster, namespace: str, tmp_path: Path, ups: Callable[..., TeamUp]
) -> None:
    image = f"docker.io/tpconf/agent-late-{uuid.uuid4().hex[:8]}:1"
    config(
        tmp_path,
        namespace,
        f"""\
late:
  new: {{image: "{image}"}}
  run: echo started > started.txt
""",
    )
    ctr = ["ctr", "-a", "/run/containerd/containerd.sock", "-n", "k8s.io", "images"]
    up = ups(tmp_path)
    try:
        up.wait_for(r"retrying in 5s, attempt 1\)", 180)
        row = rows(status_json(cluster, tmp_path))[0]
        assert str(row["problem"]).startswith("retrying in "), row
        assert "cannot pull image" in str(row["problem"])
        # The image arrives (as `make agent-image` would load it): the next attempt starts.
        subprocess.run(
            [*ctr, "tag", "docker.io/tpconf/agent:0.1.0", image],
            check=True,
            capture_output=True,
            timeout=60,
        )
        up.wait_for(r"^late ready", 240)
        wait_until(lambda: file_text(tmp_path / "started.txt") == "started\n", 30, "the command")
        assert up.stop() == 0, up.output[-3000:]
    finally:
        subprocess.run([*ctr, "rm", image], capture_output=True, timeout=60, check=False)


# ---- 7. init -----------------------------------------------------------------------------------


def test_init_writes_a_commented_file_for_the_picked_deployments(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    ns = namespace
    deploy(cluster, ns, deployment("web", NGINX, ports=[80]), deployment("api", NGINX))
    (tmp_path / ".gitignore").write_text("node_modules/")
    asked = subprocess.run(
        [*TPCONF, "init", "-n", ns],
        cwd=tmp_path,
        env=tpconf_env(cluster),
        input="",  # not a terminal: nothing to pick from
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert asked.returncode == 1
    assert f"which Deployments of namespace {ns}? api, web" in asked.stderr
    out = tpconf(cluster, tmp_path, "init", "-n", ns, "web")
    assert "wrote telepresence.yaml for web" in out
    text = (tmp_path / "telepresence.yaml").read_text()
    assert text.startswith("# yaml-language-server: $schema=.tpconf/telepresence.schema.json\n")
    assert "    swap: web\n" in text and "The container's ports (80)" in text
    assert "# allowed-contexts: [tpconf-local]" in text
    assert (tmp_path / ".gitignore").read_text() == (
        "node_modules/\n# tpconf: its state, and personal overrides\n.tpconf/\n"
        "telepresence.override.yaml\n"
    )
    schema = json.loads((tmp_path / ".tpconf/telepresence.schema.json").read_text())
    assert schema["title"] == "telepresence.yaml"
    assert (
        tpconf(cluster, tmp_path, "validate") == "telepresence.yaml is valid: 1 deployment (web)\n"
    )
    again = run_tpconf(cluster, tmp_path, "init", "-n", ns, "--all")
    assert again.returncode == 1 and "exists already" in again.stderr
    tpconf(cluster, tmp_path, "init", "-n", ns, "--all", "--force")
    assert tpconf(cluster, tmp_path, "config", "--services").split() == ["api", "web"]
    assert (tmp_path / ".gitignore").read_text().count(".tpconf/") == 1
