"""Reading the file itself: missing, a directory, too big, not UTF-8, tabs, empty; discovery."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpconf.config import find_config_file, load_project
from tpconf.config.yamlsource import MAX_FILE_SIZE
from tpconf.errors import ConfigError
from tpconf.methods import REGISTRY

VALID = "version: 1\ndeployments:\n  a:\n    new: true\n"


def _error(path: Path | str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_project(path, methods=REGISTRY, env={})
    return info.value


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_missing_file(in_tmp: Path) -> None:
    error = _error("nope.yaml")
    assert str(error) == "nope.yaml: file not found"
    assert error.hint is not None and "-f" in error.hint


def test_a_directory(in_tmp: Path) -> None:
    (in_tmp / "conf").mkdir()
    error = _error("conf")
    assert str(error) == "conf: is a directory, not a file"
    assert error.hint == "pass the file inside it: `-f conf/telepresence.yaml`"


def test_a_file_over_the_size_cap(in_tmp: Path) -> None:
    (in_tmp / "big.yaml").write_text(VALID + "#" * MAX_FILE_SIZE)
    assert str(_error("big.yaml")) == "big.yaml: file is larger than 1024 KiB"


def test_a_file_at_the_size_cap_is_read(in_tmp: Path) -> None:
    (in_tmp / "t.yaml").write_text(VALID + "#" * (MAX_FILE_SIZE - len(VALID)))
    assert load_project("t.yaml", methods=REGISTRY, env={}).names == ("a",)


def test_non_utf8_bytes_are_reported_at_the_bad_byte(in_tmp: Path) -> None:
    (in_tmp / "t.yaml").write_bytes(b"version: 1\ndeployments:\n  h\xe9llo:\n")
    error = _error("t.yaml")
    assert str(error) == "t.yaml:3:4: file is not UTF-8 text: byte 0xe9 cannot be decoded"


def test_the_column_of_a_bad_byte_counts_characters(in_tmp: Path) -> None:
    (in_tmp / "t.yaml").write_bytes("# é\nrun: é".encode() + b"\xff\n")
    assert str(_error("t.yaml")).startswith("t.yaml:2:7: ")


def test_a_utf8_bom_is_accepted(in_tmp: Path) -> None:
    (in_tmp / "t.yaml").write_bytes(b"\xef\xbb\xbf" + VALID.encode())
    assert load_project("t.yaml", methods=REGISTRY, env={}).names == ("a",)


def test_utf16_is_not_utf8(in_tmp: Path) -> None:
    (in_tmp / "t.yaml").write_bytes(VALID.encode("utf-16"))
    assert "file is not UTF-8 text" in str(_error("t.yaml"))


def test_an_empty_file(in_tmp: Path) -> None:
    (in_tmp / "t.yaml").write_text("")
    error = _error("t.yaml")
    assert str(error) == "t.yaml:1:1: file is empty"
    assert error.hint is not None and "version: 1" in error.hint


def test_a_file_of_comments_is_empty(in_tmp: Path) -> None:
    (in_tmp / "t.yaml").write_text("# nothing here\n\n")
    assert str(_error("t.yaml")) == "t.yaml:1:1: file is empty"


def test_a_tab_is_pointed_at(in_tmp: Path) -> None:
    (in_tmp / "t.yaml").write_text("version: 1\ndeployments:\n  a:\n  \tnew: true\n")
    error = _error("t.yaml")
    assert str(error) == "t.yaml:4:3: tab character used for indentation"
    assert error.hint is not None and "spaces" in error.hint


def test_a_control_character_is_pointed_at(in_tmp: Path) -> None:
    (in_tmp / "t.yaml").write_text("version: 1\nrun: a\x01b\n")
    assert str(_error("t.yaml")) == (
        "t.yaml:2:7: invalid YAML: control character U+0001 is not allowed"
    )


def test_an_unreadable_file(in_tmp: Path) -> None:
    (in_tmp / "t.yaml").write_text(VALID)
    (in_tmp / "t.yaml").chmod(0)
    if os.geteuid() != 0:
        assert str(_error("t.yaml")) == "t.yaml: cannot read the file: permission denied"
        return
    # Root reads any file: check it as `nobody` in a child (the test tree must be traversable).
    in_tmp.chmod(0o755)
    for parent in in_tmp.parents:
        if parent.stat().st_mode & 0o001 == 0:
            parent.chmod(parent.stat().st_mode | 0o001)
    proc = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-m", "tpconf", "validate", "-f", "t.yaml"],
        cwd=in_tmp, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr == "t.yaml: cannot read the file: permission denied\n  hint: check its mode\n"
    )


def test_paths_are_relative_to_the_file_not_the_cwd(in_tmp: Path) -> None:
    (in_tmp / "sub").mkdir()
    (in_tmp / "sub" / "t.yaml").write_text(VALID)
    project = load_project("sub/t.yaml", methods=REGISTRY, env={})
    assert project.base_dir == in_tmp / "sub"
    assert project.source_path == in_tmp / "sub" / "t.yaml"
    volumes = project.deployments[0].volumes
    assert volumes is not None and volumes.root == in_tmp / "sub" / ".tpconf" / "a"


def test_discovery_finds_the_file_in_the_cwd(in_tmp: Path) -> None:
    (in_tmp / "telepresence.yaml").write_text(VALID)
    assert find_config_file() == Path("telepresence.yaml")


def test_discovery_walks_up_to_the_nearest_parent(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (in_tmp / "telepresence.yaml").write_text(VALID)
    (in_tmp / "a" / "b").mkdir(parents=True)
    (in_tmp / "a" / "telepresence.yaml").write_text(VALID)
    monkeypatch.chdir(in_tmp / "a" / "b")
    assert find_config_file() == Path("../telepresence.yaml")


def test_discovery_from_a_start_directory_is_absolute(in_tmp: Path) -> None:
    (in_tmp / "telepresence.yaml").write_text(VALID)
    (in_tmp / "x").mkdir()
    assert find_config_file(in_tmp / "x") == in_tmp / "telepresence.yaml"


def test_discovery_ignores_a_directory_named_like_the_file(in_tmp: Path) -> None:
    (in_tmp / "telepresence.yaml").mkdir()
    with pytest.raises(ConfigError) as info:
        find_config_file(in_tmp)
    assert info.value.message.startswith("no telepresence.yaml in ")
