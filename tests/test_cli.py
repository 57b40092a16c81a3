"""The command line: exit codes 0/1/2, messages without tracebacks, --version, --debug."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from tpconf import __version__, cli, errors
from tpconf.errors import ClusterError, ConfigError, Position

VALID = "version: 1\ndeployments:\n  a:\n    new: true\n  b:\n    swap: web\n"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"tpconf {__version__}\n", "")


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("validate", "schema", "up", "down", "status", "plan", "env"):
        assert command in out


def test_validate_a_valid_file(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (in_tmp / "telepresence.yaml").write_text(VALID)
    assert run(capsys, "validate") == (
        0,
        "telepresence.yaml is valid: 2 deployments (a, b)\n",
        "",
    )


def test_validate_finds_the_file_in_a_parent(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (in_tmp / "telepresence.yaml").write_text(VALID)
    (in_tmp / "sub").mkdir()
    monkeypatch.chdir(in_tmp / "sub")
    code, out, _ = run(capsys, "validate")
    assert (code, out) == (0, "../telepresence.yaml is valid: 2 deployments (a, b)\n")


def test_validate_with_f_and_one_deployment(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "x.yaml").write_text("version: 1\ndeployments:\n  a:\n    new: true\n")
    assert run(capsys, "validate", "-f", "x.yaml")[:2] == (0, "x.yaml is valid: 1 deployment (a)\n")


def test_validate_prints_warnings_and_succeeds(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "t.yaml").write_text(
        "version: 1\ndeployments:\n  a:\n    new: true\n    expose: [80]\n"
    )
    code, out, err = run(capsys, "validate", "-f", "t.yaml")
    assert code == 0
    assert out == "t.yaml is valid: 1 deployment (a)\n"
    assert err.startswith("t.yaml:5:14: warning: deployments.a.expose[0]: remote port 80 is below")
    assert "\n  hint: " in err


def test_validate_an_invalid_file_exits_2_with_every_error(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "t.yaml").write_text(
        "version: 1\ndeployments:\n  a:\n    new: true\n    expsoe: [1]\n    method: vpn\n"
    )
    code, out, err = run(capsys, "validate", "-f", "t.yaml")
    assert (code, out) == (2, "")
    assert err == (
        "t.yaml:5:5: deployments.a.expsoe: unknown key `expsoe`\n"
        "  hint: did you mean `expose`?\n"
        "t.yaml:6:13: deployments.a.method: `vpn` is not allowed: expected `inject-tcp` or "
        "`vpn-tcp` or `container`\n"
        "  hint: did you mean `vpn-tcp`?\n"
    )


def test_long_messages_are_not_wrapped(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (in_tmp / "t.yaml").write_text("version: 1\ndeployments:\n  a:\n    run: x\n")
    _, _, err = run(capsys, "validate", "-f", "t.yaml")
    assert err.splitlines()[0] == (
        "t.yaml:3:3: deployments.a: no operation: set one of `new`, `swap`, `existing` or `intercept`"
    )


def test_no_file_found_exits_2(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "validate")
    assert code == 2
    assert err.startswith("telepresence.yaml: no telepresence.yaml in ")


def test_a_missing_file_exits_2(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "validate", "-f", "nope.yaml")
    assert code == 2
    assert err.startswith("nope.yaml: file not found\n")
    assert "Traceback" not in err


def test_status_without_a_running_up_says_so_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "telepresence.yaml").write_text("version: 1\ndeployments: {}\n")
    code, out, _ = run(capsys, "status", "-f", str(tmp_path / "telepresence.yaml"))
    assert (code, out) == (1, "tpconf up is not running here\n")


def test_env_without_a_running_up_explains_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "telepresence.yaml").write_text("version: 1\ndeployments: {}\n")
    code, _, err = run(capsys, "env", "web", "-f", str(tmp_path / "telepresence.yaml"))
    assert code == 1
    assert err.startswith("tpconf up is not running for this project\n  hint: start `tpconf up`")


def test_plan_describes_every_deployment_without_touching_the_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "telepresence.yaml"
    config.write_text(
        "version: 1\nnamespace: dev\ndeployments:\n"
        "  web:\n    new: true\n    expose: ['8080:80']\n    run: [python3, -m, http.server]\n"
        "  api:\n    swap: api:main\n    method: vpn-tcp\n"
    )
    code, out, _ = run(capsys, "plan", "-f", str(config))
    assert code == 0
    assert "+ create Deployment dev/web running tpconf/agent:0.1.0" in out
    assert "+ create Service dev/web on port(s) 80" in out
    assert "+ expose: cluster port 80 -> localhost:8080" in out
    assert "+ run: python3 -m http.server" in out
    assert "~ swap Deployment dev/api (container main): scale to 0" in out
    assert "+ vpn-tcp routes for the whole machine" in out
    assert "16 unit(s) to start:\n  + web: proxy\n  + web: tunnel\n" in out
    assert out.rstrip().endswith("+ api: process")


def test_a_bad_command_line_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "validate", "--nope")
    assert code == 2
    assert "No such option '--nope'" in err


def test_schema_check_passes_on_the_committed_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "schema", "--check") == (0, "schema and docs are up to date\n", "")


def test_schema_writes_and_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "project_root", lambda: tmp_path)
    code, _, err = run(capsys, "schema", "--check")
    assert code == 1
    assert err.startswith("writing the schema and docs is for a source checkout of tpconf\n")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "schemas").mkdir()
    code, _, err = run(capsys, "schema", "--check")
    assert code == 1
    assert err.startswith("schema is out of date: run `make schema` and commit")
    assert run(capsys, "schema")[:2] == (
        0,
        "wrote schemas/telepresence.schema.json\nwrote docs/configuration.md\n",
    )
    assert run(capsys, "schema", "--check")[0] == 0


def _failing(exc: BaseException) -> click.Command:
    def callback() -> None:
        raise exc

    return click.Command("boom", callback=callback)


@pytest.fixture
def boom() -> Iterator[list[click.Command]]:
    added: list[click.Command] = []
    yield added
    for command in added:
        cli.cli.commands.pop(command.name or "", None)


def _add(boom: list[click.Command], exc: BaseException) -> None:
    command = _failing(exc)
    cli.cli.add_command(command)
    boom.append(command)


def test_an_unexpected_exception_is_a_bug_without_traceback(
    boom: list[click.Command], capsys: pytest.CaptureFixture[str]
) -> None:
    _add(boom, ZeroDivisionError("division by zero"))
    code, _, err = run(capsys, "boom")
    assert code == 1
    assert err == f"error: ZeroDivisionError: division by zero\n{errors.BUG_MESSAGE}\n"


def test_debug_shows_the_traceback(
    boom: list[click.Command], capsys: pytest.CaptureFixture[str]
) -> None:
    _add(boom, ZeroDivisionError("division by zero"))
    code, _, err = run(capsys, "--debug", "boom")
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert errors.BUG_MESSAGE in err


def test_exception_groups_are_unwrapped_to_their_errors(
    boom: list[click.Command], capsys: pytest.CaptureFixture[str]
) -> None:
    inner = ExceptionGroup("inner", [ClusterError("cluster is unreachable")])
    _add(boom, ExceptionGroup("outer", [inner, ConfigError("bad", position=Position("f", 1, 2))]))
    code, _, err = run(capsys, "boom")
    assert code == 2
    assert sorted(err.splitlines()) == ["cluster is unreachable", "f:1:2: bad"]


def test_python_dash_m_works(tmp_path: Path) -> None:
    (tmp_path / "telepresence.yaml").write_text("version: 1\ndeployments: {}\n")
    result = subprocess.run(
        [sys.executable, "-m", "tpconf", "validate"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "telepresence.yaml is valid: 0 deployments\n")


def test_validate_loads_none_of_what_only_running_needs(tmp_path: Path) -> None:
    """`validate` (and completion, `config`) import only what reading the file needs: no
    asyncio (process supervision), no cluster client, no SSH, no rich (bench/RESULTS.md)."""
    (tmp_path / "telepresence.yaml").write_text(VALID)
    probe = (
        "import sys\n"
        "from tpconf import cli\n"
        "code = cli.main(['validate'])\n"
        "heavy = ('asyncio', 'urllib3', 'asyncssh', 'kubernetes', 'rich', 'dnslib')\n"
        "print(code, sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert out.strip().splitlines()[-1] == "0 []"
