"""A project's files together: telepresence.override.yaml, repeated -f, .env, --context and
--namespace, `${VAR:?message}`; selection by name and by profile; `restart`, `allowed-contexts`.
Every error names the file it is in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tpconf.config import ConfigFiles, load_project
from tpconf.config.dotenv import parse_dotenv
from tpconf.config.interpolate import InterpolationError, interpolate
from tpconf.errors import ConfigError, ConfigErrors
from tpconf.methods import REGISTRY

BASE = """\
version: 1
namespace: team
deployments:
  api:
    swap: api
    expose: [8080]
    run: [npm, start]
    env:
      set: {LEVEL: info, COLOR: blue}
  web:
    new: true
    run: make serve
  debug:
    new: true
    profiles: [debug]
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "telepresence.yaml").write_text(BASE)
    return tmp_path


def error_of(text: str) -> str:
    """The error of loading ``text`` as t.yaml in the current directory."""
    Path("t.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_project("t.yaml", methods=REGISTRY, env={})
    return str(info.value)


def test_the_override_file_beside_the_file_is_merged_key_by_key_and_lists_replaced(
    project: Path,
) -> None:
    (project / "telepresence.override.yaml").write_text(
        "deployments:\n  api:\n    expose: [9090]\n    env:\n      set: {LEVEL: debug}\n"
        "    run: [npm, run, dev]\n"
    )
    loaded = load_project(ConfigFiles.find(), methods=REGISTRY, env={})
    api = loaded.deployment("api")
    assert [m.remote for m in api.expose] == [9090]  # the list is replaced, not appended to
    assert api.env.as_dict() == {"LEVEL": "debug", "COLOR": "blue"}  # the mapping is merged
    assert api.run == ("npm", "run", "dev")
    assert api.namespace == "team"  # what the override does not say stays


def test_with_f_the_override_file_is_not_read_and_further_f_files_are(project: Path) -> None:
    (project / "telepresence.override.yaml").write_text("namespace: from-override\n")
    (project / "ci.yaml").write_text("namespace: from-ci\n")
    alone = load_project(ConfigFiles.find([Path("telepresence.yaml")]), methods=REGISTRY, env={})
    assert alone.namespace == "team"
    both = ConfigFiles.find([Path("telepresence.yaml"), Path("ci.yaml")])
    assert load_project(both, methods=REGISTRY, env={}).namespace == "from-ci"


def test_an_error_in_the_override_names_the_override_file_and_its_position(
    project: Path,
) -> None:
    (project / "telepresence.override.yaml").write_text(
        "deployments:\n  api:\n    expose: [99999]\n  web:\n    methd: vpn-tcp\n"
    )
    with pytest.raises(ConfigErrors) as info:
        load_project(ConfigFiles.find(), methods=REGISTRY, env={})
    assert str(info.value) == (
        "telepresence.override.yaml:3:14: deployments.api.expose[0]: port 99999 is out of "
        "range: ports are 1 to 65535\n"
        "telepresence.override.yaml:5:5: deployments.web.methd: unknown key `methd`"
    )


def test_a_rule_across_files_points_at_each_file(project: Path) -> None:
    (project / "telepresence.override.yaml").write_text("deployments:\n  web:\n    shell: true\n")
    with pytest.raises(ConfigError) as info:
        load_project(ConfigFiles.find(), methods=REGISTRY, env={})
    assert str(info.value) == (
        "telepresence.override.yaml:3:5: deployments.web.shell: `shell: true` and `run` cannot "
        "be combined"
    )
    assert info.value.hint == "remove `run` (`deployments.web.run`), or set `shell: false`"


def test_an_empty_override_file_changes_nothing(project: Path) -> None:
    (project / "telepresence.override.yaml").write_text("# my overrides\n")
    assert load_project(ConfigFiles.find(), methods=REGISTRY, env={}).names == (
        "api",
        "web",
        "debug",
    )


def test_dotenv_feeds_interpolation_and_the_environment_wins(project: Path) -> None:
    (project / ".env").write_text(
        "# personal\nexport NS=from-dotenv\nPORT=9000 # comment\nNAME='lit $NS'\n"
        'GREETING="hi ${NS}\\n"\n'
    )
    (project / "telepresence.override.yaml").write_text(
        "namespace: ${NS}\ndeployments:\n  api:\n    expose: ['${PORT}']\n"
        "    env: {set: {N: '${NAME}', G: '${GREETING}'}}\n"
    )
    loaded = load_project(ConfigFiles.find(), methods=REGISTRY, env={})
    assert loaded.namespace == "from-dotenv"
    api = loaded.deployment("api")
    assert api.expose[0].local == 9000
    assert api.env.as_dict()["N"] == "lit $NS"
    assert api.env.as_dict()["G"] == "hi from-dotenv\n"
    winning = load_project(ConfigFiles.find(), methods=REGISTRY, env={"NS": "from-shell"})
    assert winning.namespace == "from-shell"


def test_a_bad_dotenv_line_is_reported_at_its_position(project: Path) -> None:
    (project / ".env").write_text("OK=1\n\n  not a variable\n")
    with pytest.raises(ConfigError) as info:
        load_project(ConfigFiles.find(), methods=REGISTRY, env={})
    assert str(info.value) == ".env:3:3: expected `KEY=VALUE`"


def test_required_variable_says_what_the_file_asks_for(project: Path) -> None:
    (project / "telepresence.override.yaml").write_text(
        "deployments:\n  api:\n    env: {set: {TOKEN: '${API_TOKEN:?ask the team for one}'}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_project(ConfigFiles.find(), methods=REGISTRY, env={"API_TOKEN": ""})
    assert str(info.value) == (
        "telepresence.override.yaml:3:24: deployments.api.env.set.TOKEN: `API_TOKEN` is not "
        "set or empty: ask the team for one"
    )
    assert info.value.hint is not None and "`.env`" in info.value.hint


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A?must}", {"A": ""}, ""),
        ("${A-d}", {"A": ""}, ""),
        ("${A-d}", {}, "d"),
        ("${A:?x}", {"A": "v"}, "v"),
    ],
)
def test_compose_interpolation_forms(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_question_mark_without_colon_accepts_an_empty_value_only() -> None:
    with pytest.raises(InterpolationError) as info:
        interpolate("${A?set A}", {})
    assert info.value.message == "`A` is not set: set A"


def test_dotenv_quoting_and_escapes() -> None:
    text = 'A=plain value  \nB=\'x\ny\'\nC="a\\"b\\\\c\\$D"\nD=${A}-${Z:-z}\n'
    assert parse_dotenv(text, ".env", {}) == {
        "A": "plain value",
        "B": "x\ny",
        "C": 'a"b\\c$D',
        "D": "plain value-z",
    }


def test_command_line_context_and_namespace_override_the_top_level(project: Path) -> None:
    files = ConfigFiles.find(context="kind-dev", namespace="mine")
    loaded = load_project(files, methods=REGISTRY, env={})
    assert (loaded.context, loaded.namespace) == ("kind-dev", "mine")
    assert {d.namespace for d in loaded.deployments} == {"mine"}


def test_a_bad_namespace_flag_is_named_as_the_flag(project: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_project(ConfigFiles.find(namespace="Not_Valid"), methods=REGISTRY, env={})
    assert str(info.value).startswith("--namespace: namespace: ")


def test_the_watched_files_include_the_missing_override_and_dotenv(project: Path) -> None:
    files = ConfigFiles.find()
    assert files.watched() == (
        Path("telepresence.yaml"),
        Path("telepresence.override.yaml"),
        Path(".env"),
    )
    assert files.project_dir == project


# ---- selection --------------------------------------------------------------------------------


def test_a_deployment_with_profiles_starts_only_when_one_is_active_or_it_is_named(
    project: Path,
) -> None:
    loaded = load_project(ConfigFiles.find(), methods=REGISTRY, env={})
    assert loaded.selected().names == ("api", "web")
    assert loaded.selected(profiles=["debug"]).names == ("api", "web", "debug")
    assert loaded.selected(["debug"]).names == ("debug",)
    assert loaded.selected(["web", "api"]).names == ("api", "web")


def test_an_unknown_name_is_refused_with_a_suggestion(project: Path) -> None:
    loaded = load_project(ConfigFiles.find(), methods=REGISTRY, env={})
    with pytest.raises(ConfigError) as info:
        loaded.selected(["apj"])
    assert info.value.message == "no deployment `apj` in the file (deployments: api, web, debug)"
    assert info.value.hint == "did you mean `api`?"


def test_a_profile_no_deployment_has_is_a_warning(project: Path) -> None:
    loaded = load_project(ConfigFiles.find(), methods=REGISTRY, env={})
    chosen = loaded.selected(profiles=["debgu"])
    assert chosen.names == ("api", "web")
    assert [w.message for w in chosen.warnings] == ["no deployment has profile `debgu`"]


def test_profiles_cannot_be_a_default(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(
        "version: 1\ndefaults:\n  profiles: [x]\ndeployments:\n  a: {new: true}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path / "t.yaml", methods=REGISTRY, env={})
    assert info.value.message == "`profiles` cannot be set in `defaults`"
    assert info.value.hint == "set `profiles` on each deployment"


# ---- restart, allowed-contexts --------------------------------------------------------------------


@pytest.mark.parametrize(("written", "policy"), [("'no'", "no"), ("no", "no"), ("false", "no"),
                                                  ("on-failure", "on-failure"), ("always", "always")])  # fmt: skip
def test_restart_policies(written: str, policy: str, tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(
        f"version: 1\ndeployments:\n  a:\n    new: true\n    run: x\n    restart: {written}\n"
    )
    assert load_project(tmp_path / "t.yaml", methods=REGISTRY, env={}).deployments[0].restart == (
        policy
    )


def test_restart_is_inherited_from_defaults_and_checked(project: Path) -> None:
    text = "version: 1\ndefaults: {restart: always}\ndeployments:\n  a: {new: true, run: x}\n"
    assert error_of(text + "  b: {new: true, run: x, restart: sometimes}\n") == (
        "t.yaml:5:35: deployments.b.restart: `sometimes` is not allowed: expected `no` or "
        "`on-failure` or `always`"
    )
    (project / "t.yaml").write_text(text)
    assert load_project("t.yaml", methods=REGISTRY, env={}).deployments[0].restart == "always"


def test_a_context_outside_allowed_contexts_is_refused_where_it_is_written(
    project: Path,
) -> None:
    text = (
        "version: 1\nallowed-contexts: [kind-dev]\ncontext: prod\ndeployments:\n"
        "  a: {new: true}\n  b: {new: true, context: kind-dev}\n"
    )
    assert error_of(text) == (
        "t.yaml:3:10: context: context `prod` is not in `allowed-contexts` (kind-dev)"
    )
    flag = ConfigFiles((Path("t.yaml"),), settings=(("--context", "context", "kind-dev"),))
    assert load_project(flag, methods=REGISTRY, env={}).context == "kind-dev"
    refused = ConfigFiles((Path("t.yaml"),), settings=(("--context", "context", "x"),))
    with pytest.raises(ConfigError) as info:
        load_project(refused, methods=REGISTRY, env={})
    assert str(info.value).startswith("--context: context: context `x` is not in")


def test_files_are_named_as_given(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "telepresence.yaml").write_text("version: 1\ndeployments: {a: {new: 1}}\n")
    with pytest.raises(ConfigError) as info:
        load_project(ConfigFiles.find([sub / "telepresence.yaml"]), methods=REGISTRY, env={})
    assert str(info.value).startswith(os.fspath(sub / "telepresence.yaml") + ":2:24: ")
