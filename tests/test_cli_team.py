"""The command line for a team (issue 13), without a cluster: `config`, overrides in `validate`,
`schema --print`, `rbac`, `status --json`, `logs`, the live start lines, completion of names,
the platform warning, and how `up` ends a scripted run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tpconf import cli
from tpconf.config import parse_project
from tpconf.config.schema import schema_text
from tpconf.methods import REGISTRY
from tpconf.reconcile.platform import limitations
from tpconf.reconcile.up import Selection, UpOptions, _Exits, exit_code
from tpconf.supervisor.output import LogFiles
from tpconf.supervisor.process import ProcessExit

FILE = """\
version: 1
namespace: ${NS:-dev}
deployments:
  api:
    new: true
    run: [npm, start]
  web:
    new: true
    profiles: [front]
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("TPCONF_PROFILES", raising=False)
    (tmp_path / "telepresence.yaml").write_text(FILE)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_config_prints_the_merged_interpolated_file(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "telepresence.override.yaml").write_text(
        "deployments:\n  api:\n    run: [npm, run, dev]\n"
    )
    (project / ".env").write_text("NS=mine\n")
    code, out, _ = run(capsys, "config")
    assert code == 0
    assert out == (
        "version: 1\nnamespace: mine\ndeployments:\n  api:\n    new: true\n    run:\n"
        "    - npm\n    - run\n    - dev\n"
    )
    assert run(capsys, "config", "--services")[1] == "api\n"
    assert run(capsys, "config", "--services", "--profile", "front")[1] == "api\nweb\n"
    assert run(capsys, "config", "--services", "web")[1] == "web\n"
    assert run(capsys, "validate")[1] == (
        "telepresence.yaml, telepresence.override.yaml are valid: 1 deployment (api)\n"
    )


def test_profiles_come_from_the_environment_too(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TPCONF_PROFILES", "front, other")
    code, out, err = run(capsys, "config", "--services")
    assert (code, out) == (0, "api\nweb\n")
    assert "warning: no deployment has profile `other`" in err


def test_config_reports_an_error_in_the_override_with_its_file(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "telepresence.override.yaml").write_text("deployments:\n  api:\n    expose: [0]\n")
    code, out, err = run(capsys, "config")
    assert (code, out) == (2, "")
    assert err.startswith("telepresence.override.yaml:3:14: deployments.api.expose[0]: ")


def test_an_unknown_name_exits_2_with_a_suggestion(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "plan", "apo")
    assert code == 2
    assert err == (
        "telepresence.yaml: no deployment `apo` in the file (deployments: api, web)\n"
        "  hint: did you mean `api`?\n"
    )


def test_schema_print_ships_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "schema", "--print")
    assert code == 0 and out == schema_text(REGISTRY)
    assert json.loads(out)["title"] == "telepresence.yaml"


def test_rbac_prints_the_role_from_the_package(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rbac")
    assert code == 0
    assert "kind: Role\n" in out and "pods/portforward" in out
    assert "tpconf rbac | kubectl apply -n NAMESPACE -f -" in out


def test_no_message_points_at_a_path_of_the_repository() -> None:
    # The package is all a user has: hints name commands (`tpconf init`, `tpconf rbac`).
    from tests.test_messages import shown_strings

    for where, text in shown_strings():
        for path in ("examples/", "docs/rbac.yaml", "make agent-image"):
            assert path not in text, f"{where}: {text!r} points at {path}"


def test_status_json_without_a_running_up(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "telepresence.yaml").write_text("version: 1\ndeployments: {}\n")
    code, out, _ = run(capsys, "status", "--json")
    assert code == 1
    assert json.loads(out) == {
        "up": "stopped",
        "pid": None,
        "session": None,
        "config": None,
        "started": None,
        "deployments": [],
        "left_in_cluster": [],
    }


def test_logs_prints_what_up_kept(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = LogFiles(project / ".tpconf" / "logs")
    logs.clear()
    logs.write("api", "listening on 8080")
    logs.notice("api", "exited with code 1")
    logs.write("web", "compiled")
    logs.close()
    assert run(capsys, "logs")[1] == (
        "api | listening on 8080\napi exited with code 1\nweb | compiled\n"
    )
    assert run(capsys, "logs", "api", "--tail", "1")[1] == "api exited with code 1\n"
    assert run(capsys, "logs", "--follow", "web")[1] == "web | compiled\n"  # no up: it ends
    code, _, err = run(capsys, "logs", "nope")
    assert code == 2 and "no deployment `nope`" in err


def test_exec_without_up_says_what_to_do(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "exec", "api", "--", "true")
    assert code == 1
    assert err.startswith("tpconf up is not running for this project\n")


def test_names_are_completed_by_the_shell(project: Path) -> None:
    env = {**os.environ, "_TPCONF_COMPLETE": "bash_complete", "COMP_WORDS": "tpconf up a",
           "COMP_CWORD": "2"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "tpconf"],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.stdout.splitlines() == ["plain,api"], done.stderr


def test_another_system_hears_at_once_what_will_not_work(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert limitations("linux") == []
    lines = limitations("darwin")
    assert lines[0] == "tpconf runs on Linux; on macOS these will not work:"
    assert any(line.startswith("  inject-tcp: needs torsocks") for line in lines)
    assert any(line.startswith("  vpn-tcp: needs iptables") for line in lines)
    monkeypatch.setattr(sys, "platform", "win32")
    (project / "telepresence.yaml").write_text("version: 1\ndeployments: {bad: 1}\n")
    _, _, err = run(capsys, "up")
    assert err.startswith("tpconf runs on Linux; on Windows these will not work:\n")


def test_the_live_start_shows_a_line_per_deployment_with_its_time() -> None:
    now = [100.0]
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    live = cli.LiveStart(console, clock=lambda: now[0])
    live.begin(["api", "web", "db"])
    assert live.note("api", "pod api-1: ContainerCreating")
    now[0] += 2.5
    assert live.note("api", "ready")
    # An error is printed in full too (with its hint); its line keeps the first line.
    assert not live.note("web", "failed: no such Deployment\n  hint: check the name")
    assert live.note("db", "pod db-1: Pending (scheduling)")
    now[0] += 1
    rendered = Console(file=io.StringIO(), width=100, color_system=None, record=True)
    rendered.print(live.render())
    assert [line.rstrip() for line in rendered.export_text().splitlines()] == [
        "✓  api    2.5s  ready",
        "✗  web    2.5s  failed: no such Deployment",
        "…  db     3.5s  pod db-1: Pending (scheduling)",
    ]
    live.end()
    assert "db-1: Pending" in out.getvalue()  # drawn on the terminal
    assert not live.note("api", "later")  # after the start: printed as usual


def test_the_selection_of_a_running_up_follows_up_and_down_names() -> None:
    project = parse_project(FILE, methods=REGISTRY, env={})
    selection = Selection()
    assert selection.apply(project).names == ("api",)
    selection.added.add("web")
    assert selection.apply(project).names == ("api", "web")
    selection.removed.add("api")
    assert selection.apply(project).names == ("web",)


def test_abort_on_exit_ends_with_the_first_exit_and_its_code() -> None:
    stops: list[int | None] = []
    exits = _Exits(UpOptions(abort_on_exit=True), stops.append)
    exits.exited("web", ProcessExit("web", 1, 0, stopped=True))  # an edit restarted it
    assert stops == []
    exits.exited("api", ProcessExit("api", 2, 3))
    assert stops == [3]


def test_exit_code_from_takes_the_named_one_even_when_stopped_by_the_abort() -> None:
    stops: list[int | None] = []
    exits = _Exits(UpOptions(exit_code_from="tests"), stops.append)
    exits.exited("server", ProcessExit("server", 1, 1))
    assert stops == [None]  # another one ended first: stop, code not known yet
    exits.exited("tests", ProcessExit("tests", 2, -15, stopped=True))
    assert exits.code == 143  # as a shell reports SIGTERM
    assert exit_code(ProcessExit("x", 1, None)) == 1
