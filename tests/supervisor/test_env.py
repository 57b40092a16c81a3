"""The process environment (precedence, TELEPRESENCE_*) and the env.export writers."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import dotenv
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tpconf.errors import ProcessError
from tpconf.supervisor.env import (
    DotenvError,
    ExportFormat,
    from_dotenv,
    pod_environment,
    process_environment,
    starts_programs,
    telepresence_variables,
    to_dotenv,
    to_json,
    withheld_variables,
    write_export,
)
from tpconf.supervisor.shell import run_shell

LOCAL = {"PATH": "/usr/bin", "HOME": "/home/me", "SHARED": "local", "EDITOR": "vi"}
POD = {
    "PATH": "/pod/bin",
    "HOME": "/root",
    "HOSTNAME": "web-5d8f-abcde",
    "SHARED": "pod",
    "REDIS_SERVICE_HOST": "10.0.0.12",
    "LOG_LEVEL": "info",
    "TELEPRESENCE_POD": "from-the-pod",
}
MOUNTS = ["/var/run/secrets/kubernetes.io/serviceaccount", "/podinfo"]


def test_local_then_pod_then_telepresence_then_overrides() -> None:
    env = process_environment(
        LOCAL,
        pod_environment(
            POD,
            pod="web-5d8f-abcde",
            container="web",
            root="/tmp/tel-x/fs",
            mounts=MOUNTS,
            overrides={"LOG_LEVEL": "debug", "PATH": "/override/bin"},
        ),
    )
    assert env == {
        "PATH": "/override/bin",  # the file wins over everything
        "HOME": "/home/me",  # the pod's HOME, PATH and HOSTNAME are not taken
        "EDITOR": "vi",
        "SHARED": "pod",  # the pod wins over the local environment
        "REDIS_SERVICE_HOST": "10.0.0.12",
        "LOG_LEVEL": "debug",
        "TELEPRESENCE_POD": "web-5d8f-abcde",  # ours win over the pod's
        "TELEPRESENCE_CONTAINER": "web",
        "TELEPRESENCE_ROOT": "/tmp/tel-x/fs",
        "TELEPRESENCE_MOUNTS": "/var/run/secrets/kubernetes.io/serviceaccount:/podinfo",
    }


def test_the_exported_environment_has_no_local_variables() -> None:
    env = pod_environment(POD, pod="p", container="c", mounts=MOUNTS)
    assert "EDITOR" not in env
    assert "HOSTNAME" not in env
    assert env["SHARED"] == "pod"


def test_root_is_set_only_when_volumes_are_mounted_and_mounts_are_deduplicated() -> None:
    assert telepresence_variables(pod="p", container="c", mounts=["/a", "/b", "/a"]) == {
        "TELEPRESENCE_POD": "p",
        "TELEPRESENCE_CONTAINER": "c",
        "TELEPRESENCE_MOUNTS": "/a:/b",
    }


def test_dotenv_single_quotes_what_it_can_and_double_quotes_the_rest() -> None:
    text = to_dotenv(
        {
            "B": 'say "hi"\\now',
            "A": "cost: $5 ${HOME} `id` $(id)",
            "CERT": "-----BEGIN-----\nabc\n-----END-----\n",
            "EMPTY": "",
            "QUOTE": "it's $HOME",
            "WINDOWS": "C:\\\\share\\",
            "CRLF": "a\r\nb",
            "UNI": "é 🚀",
        },
        header="pod environment of web\nwritten by tpconf",
    )
    assert text == (
        "# pod environment of web\n"
        "# written by tpconf\n"
        "A='cost: $5 ${HOME} `id` $(id)'\n"
        "B='say \"hi\"\\now'\n"
        "CERT='-----BEGIN-----\nabc\n-----END-----\n'\n"
        'CRLF="a\r\nb"\n'
        "EMPTY=''\n"
        'QUOTE="it\'s \\$HOME"\n'
        "UNI='é 🚀'\n"
        'WINDOWS="C:\\\\\\\\share\\\\"\n'
    )


@pytest.mark.parametrize("key", ["1ABC", "-x", "A B", "A=B", "", "KEY\n", "é", "a.b", "my-key"])
def test_dotenv_refuses_keys_that_are_not_shell_names_and_says_to_use_json(key: str) -> None:
    with pytest.raises(DotenvError, match="not a shell name") as caught:
        to_dotenv({key: "v"})
    assert caught.value.hint is not None and "format json" in caught.value.hint
    assert json.loads(to_json({key: "v"})) == {key: "v"}  # JSON holds it


def test_dotenv_refuses_nul_in_values() -> None:
    with pytest.raises(DotenvError, match="NUL"):
        to_dotenv({"A": "a\0b"})


def test_the_parser_reads_common_dotenv_forms_as_bash_does() -> None:
    text = (
        "# comment\n\n"
        "export A=plain value # comment\n"
        "B='single $QUOTED \\n'\n"
        'C="multi\nline"  # trailing comment\n'
        'D="tab\\there \\$x \\` \\" \\\\"\n'
        "E=\n"
    )
    assert from_dotenv(text) == {
        "A": "plain value",
        "B": "single $QUOTED \\n",
        "C": "multi\nline",
        "D": 'tab\\there $x ` " \\',
        "E": "",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("JUSTAKEY\n", "line 1: expected KEY=VALUE"),
        ('\nA="open\n', "line 2: unterminated"),
        ('A="x" y\n', "line 1: unexpected text"),
        ("1A=x\n", "line 1: invalid variable name"),
    ],
)
def test_the_parser_reports_the_line_of_an_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_dotenv(text)


keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
# Text: a lone surrogate is refused for dotenv (tests/fuzz/test_dotenv.py).
values = st.text(
    alphabet=st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=60
)


@given(st.dictionaries(keys, values, max_size=8))
def test_dotenv_round_trips_exactly(env: dict[str, str]) -> None:
    assert from_dotenv(to_dotenv(env, header="a header")) == env


# ---- hostile values, read back by bash, sh, python-dotenv and Docker Compose ------------------

#: Values a pod may hold that a careless dotenv writer turns into commands, or garbles. Each is
#: written to one file, which real bash and sh source; nothing may run (a command would create
#: the file `pwned`) and each variable must come back as it was.
HOSTILE = [
    "`touch pwned`",
    "a`touch pwned`b",
    "$(touch pwned)",
    "x$(touch pwned)y",
    "${HOME}",
    "$HOME",
    "${HOME:-$(touch pwned)}",
    "$((1+1))",
    "'; touch pwned; '",
    "'$(touch pwned)'",
    '"; touch pwned; "',
    '"$(touch pwned)"',
    '"`touch pwned`"',
    "a'b",
    "it's $HOME and `id`",
    "'",
    "''",
    '"',
    "\\",
    "\\\\",
    "ends with a backslash\\",
    "back\\slash",
    "\\$HOME",
    "\\`touch pwned\\`",
    "C:\\Program Files\\x",
    "line one\nline two",
    "\ntouch pwned\n",
    "first\n' ; touch pwned ; echo '",
    "a\r\nb",
    "\r",
    "trailing space ",
    " leading space",
    "tab\tinside",
    "; touch pwned",
    "&& touch pwned",
    "| touch pwned",
    "> pwned",
    "< /etc/passwd",
    "# not a comment",
    "value # with a hash",
    "=",
    "a=b=c",
    "!!",
    "!$",
    "~",
    "*",
    "{a,b}",
    "é 🚀 ✓",
    "",
    "export X=1; touch pwned",
]


def _keyed(values: list[str]) -> dict[str, str]:
    return {f"V{i:02d}": value for i, value in enumerate(values)}


def _double_quoted(value: str) -> bool:
    return to_dotenv({"K": value}).startswith('K="')


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_fifty_hostile_values_source_unchanged_and_run_nothing(tmp_path: Path, shell: str) -> None:
    assert len(HOSTILE) == 50
    env = _keyed(HOSTILE)
    write_export(tmp_path / "pod.env", env)
    script = (
        'set -a; . ./pod.env; exec "$PYTHON" -c "import json, os, sys; '
        'json.dump({k: os.environ.get(k) for k in sys.argv[1:]}, sys.stdout)" "$@"'
    )
    done = subprocess.run(
        [shell, "-c", script, shell, *env],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "HOME": "/nonexistent", "PYTHON": sys.executable},
        capture_output=True,
        check=False,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    assert json.loads(done.stdout) == env
    assert not (tmp_path / "pwned").exists()


def test_python_dotenv_reads_the_hostile_values_back_but_for_the_documented_cases(
    tmp_path: Path,
) -> None:
    env = _keyed(HOSTILE)
    path = write_export(tmp_path / "pod.env", env)
    read = dotenv.dotenv_values(path, interpolate=False)
    differ = {k for k in env if read.get(k) != env[k]}
    # python-dotenv keeps the backslash before `$` and a backtick in double quotes, and its
    # text mode reads a carriage return as a newline: documented in tpconf/supervisor/env.py
    expected = {
        k for k, v in env.items() if _double_quoted(v) and ("$" in v or "`" in v or "\r" in v)
    }
    assert differ == expected
    assert len(differ) <= 6  # nearly all of them read back exactly
    # With its default interpolation, `${NAME}` is replaced in any value: also documented.
    interpolated = dotenv.dotenv_values(path)
    assert {k for k in env if interpolated.get(k) != env[k]} - differ == {
        k for k, v in env.items() if "${" in v
    }
    assert not (tmp_path / "pwned").exists()


@pytest.fixture(scope="session")
def compose_env(tmp_path_factory: pytest.TempPathFactory) -> str:
    """compose-go's env_file reader (what `docker compose` uses), built from composeenv/."""
    out = tmp_path_factory.mktemp("composeenv") / "composeenv"
    subprocess.run(
        ["go", "build", "-o", str(out), "."],
        cwd=Path(__file__).with_name("composeenv"),
        env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"},
        check=True,
        capture_output=True,
        timeout=240,
    )
    return str(out)


@pytest.mark.timeout(300)
def test_docker_compose_reads_the_hostile_values_back_but_for_the_documented_cases(
    tmp_path: Path, compose_env: str
) -> None:
    env = _keyed(HOSTILE)
    path = write_export(tmp_path / "pod.env", env)
    done = subprocess.run(
        [compose_env, str(path)], capture_output=True, text=True, check=True, timeout=20
    )
    read = json.loads(done.stdout)
    differ = {k for k in env if read.get(k) != env[k]}
    # Compose keeps the backslash before a backtick in double quotes: documented in env.py
    assert differ == {k for k, v in env.items() if _double_quoted(v) and "`" in v}
    assert len(differ) <= 2


@given(st.dictionaries(keys, values, max_size=8))
def test_json_round_trips_sorted(env: dict[str, str]) -> None:
    text = to_json(env)
    assert json.loads(text) == env
    assert list(json.loads(text)) == sorted(env)


def test_json_is_indented_and_keeps_unicode() -> None:
    assert to_json({"B": "é", "A": "1"}) == '{\n    "A": "1",\n    "B": "é"\n}\n'


@pytest.mark.parametrize("fmt", ["dotenv", "json"])
def test_export_replaces_the_file_atomically_with_mode_0600(
    tmp_path: Path, fmt: ExportFormat
) -> None:
    target = tmp_path / "web.env"
    target.write_text("old")
    target.chmod(0o644)
    env = {"SECRET": "s3cr3t\n$"}
    assert write_export(target, env, fmt) == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    text = target.read_text(encoding="utf-8")
    assert (from_dotenv(text) if fmt == "dotenv" else json.loads(text)) == env
    assert list(tmp_path.iterdir()) == [target]


def test_a_failed_export_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "web.env"
    target.write_text("old")
    with pytest.raises(DotenvError):
        write_export(target, {"BAD KEY": "x"})
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


# ---- pod variables that would change how local programs start ---------------------------------

HOSTILE_POD = {
    "LD_PRELOAD": "/tmp/evil.so",
    "LD_LIBRARY_PATH": "/evil/lib",
    "GLIBC_TUNABLES": "glibc.malloc.mxfast=0",
    "BASH_ENV": "./startup.sh",
    "ENV": "./startup.sh",
    "PROMPT_COMMAND": "touch pwned",
    "PS1": "$(touch pwned)$ ",
    "BASH_FUNC_ls%%": "() { touch pwned; }",
    "SHELL": "/bin/evil-shell",
    "PYTHONSTARTUP": "./startup.py",
    "NODE_OPTIONS": "--require ./startup.js",
    "DATABASE_URL": "postgres://db:5432/app",
}


def test_pod_variables_that_change_how_programs_start_are_withheld_unless_the_file_sets_them() -> (
    None
):
    overrides = {"LD_LIBRARY_PATH": "/opt/app/lib"}
    env = pod_environment(HOSTILE_POD, pod="p", container="c", overrides=overrides)
    assert env["DATABASE_URL"] == "postgres://db:5432/app"
    assert env["LD_LIBRARY_PATH"] == "/opt/app/lib"  # named in env.set: the file's value
    assert not set(HOSTILE_POD) - {"DATABASE_URL", "LD_LIBRARY_PATH"} & set(env)
    assert withheld_variables(HOSTILE_POD, overrides) == sorted(
        set(HOSTILE_POD) - {"DATABASE_URL", "LD_LIBRARY_PATH"}
    )
    local = {"PATH": "/usr/bin", "LD_PRELOAD": "/usr/lib/libeatmydata.so", "SHELL": "/bin/zsh"}
    full = process_environment(local, env)
    assert (full["LD_PRELOAD"], full["SHELL"]) == ("/usr/lib/libeatmydata.so", "/bin/zsh")
    assert all(starts_programs(name) for name in withheld_variables(HOSTILE_POD))


def test_a_local_bash_started_with_a_hostile_pods_environment_runs_nothing_of_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "startup.sh").write_text("touch pwned\n")
    env = process_environment(
        {"PATH": os.environ["PATH"]}, pod_environment(HOSTILE_POD, pod="p", container="c")
    )
    for argv in (["bash", "-c", "ls > /dev/null"], ["bash", "-i", "-c", "true"]):
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, timeout=20, check=False
        )
        assert done.returncode == 0, done.stderr
    assert not (tmp_path / "pwned").exists()
    # the same pod environment unfiltered does run it: the test can tell
    subprocess.run(["bash", "-c", "ls > /dev/null"], cwd=tmp_path, env={**env, **HOSTILE_POD},
                   capture_output=True, timeout=20, check=False)  # fmt: skip
    assert (tmp_path / "pwned").exists()


@pytest.mark.anyio
async def test_the_interactive_shell_is_the_local_one_even_when_the_file_sets_shell(
    tmp_path: Path,
) -> None:
    impostor = tmp_path / "impostor"
    impostor.write_text(f"#!/bin/sh\ntouch {tmp_path}/pwned\n")
    impostor.chmod(0o755)
    env = process_environment(
        os.environ,
        pod_environment(
            {"SHELL": "/bin/sh"}, pod="p", container="c", overrides={"SHELL": str(impostor)}
        ),
    )
    assert env["SHELL"] == str(impostor)  # the process gets what the file says
    with anyio.fail_after(20):
        result = await run_shell(
            "web",
            env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    assert result.returncode == 0  # an interactive bash (or $SHELL) with no input: it leaves
    assert not (tmp_path / "pwned").exists()


def test_an_export_into_a_missing_directory_creates_it_for_the_owner_only(tmp_path: Path) -> None:
    target = tmp_path / "out" / "deeper" / "env.json"
    write_export(target, {"A": "1"}, "json")
    assert json.loads(target.read_text()) == {"A": "1"}
    for directory in (tmp_path / "out", tmp_path / "out" / "deeper"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_an_export_that_cannot_be_written_names_the_key_to_change(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ProcessError, match="cannot write the environment to") as caught:
        write_export(tmp_path / "a-file" / "env.json", {"A": "1"}, "json")
    assert caught.value.hint is not None and "env.export" in caught.value.hint
