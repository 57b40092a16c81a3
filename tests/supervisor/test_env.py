"""The process environment (precedence, TELEPRESENCE_*) and the env.export writers."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tpconf.supervisor.env import (
    ExportFormat,
    from_dotenv,
    pod_environment,
    process_environment,
    telepresence_variables,
    to_dotenv,
    to_json,
    write_export,
)

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


def test_dotenv_quotes_and_escapes_every_value() -> None:
    text = to_dotenv(
        {
            "B": 'say "hi"\\now',
            "A": "cost: $5 ${HOME}",
            "CERT": "-----BEGIN-----\nabc\r\n-----END-----\n",
            "EMPTY": "",
            "my.key-1": "é 🚀",
        },
        header="pod environment of web\nwritten by tpconf",
    )
    assert text == (
        "# pod environment of web\n"
        "# written by tpconf\n"
        'A="cost: \\$5 \\${HOME}"\n'
        'B="say \\"hi\\"\\\\now"\n'
        'CERT="-----BEGIN-----\\nabc\\r\\n-----END-----\\n"\n'
        'EMPTY=""\n'
        'my.key-1="é 🚀"\n'
    )


@pytest.mark.parametrize("key", ["1ABC", "-x", "A B", "A=B", "", "KEY\n", "é"])
def test_dotenv_refuses_keys_it_cannot_write(key: str) -> None:
    with pytest.raises(ValueError, match="use JSON"):
        to_dotenv({key: "v"})


def test_dotenv_refuses_nul_in_values() -> None:
    with pytest.raises(ValueError, match="NUL"):
        to_dotenv({"A": "a\0b"})


def test_the_parser_reads_common_dotenv_forms() -> None:
    text = (
        "# comment\n\n"
        "export A=plain value # comment\n"
        "B='single $QUOTED \\n'\n"
        'C="multi\nline"  # trailing comment\n'
        'D="tab\\there"\n'
        "E=\n"
    )
    assert from_dotenv(text) == {
        "A": "plain value",
        "B": "single $QUOTED \\n",
        "C": "multi\nline",
        "D": "tab\there",
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


keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,20}", fullmatch=True)
values = st.text(alphabet=st.characters(exclude_characters="\0"), max_size=60)


@given(st.dictionaries(keys, values, max_size=8))
def test_dotenv_round_trips_exactly(env: dict[str, str]) -> None:
    assert from_dotenv(to_dotenv(env, header="a header")) == env


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
    with pytest.raises(ValueError):
        write_export(target, {"BAD KEY": "x"})
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
