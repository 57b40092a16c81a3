"""Fuzzing the dotenv export: any environment a pod can have, sourced by a real bash.

For any values (quotes, backslashes, dollars, backticks, newlines, carriage returns, any Unicode
a pod's JSON can carry, lone surrogates included) the export either is refused with a
DotenvError, or ``set -a; . FILE`` in bash sets every variable to exactly its value and runs
nothing. The JSON export takes every key and value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import FUZZ
from tpconf.supervisor.env import DotenvError, write_export

pytestmark = pytest.mark.timeout(300)

#: Shell names, prefixed: bash keeps its own `_`, `UID`, `PPID`, `SHELLOPTS`... whatever a file
#: says (documented in tpconf/supervisor/env.py).
keys = st.from_regex(r"P_[A-Za-z0-9_]{0,12}", fullmatch=True)
pieces = st.sampled_from(["'", '"', "\\", "$", "`", "\n", "\r", "$(touch pwned)", "${X}", "!", " "])
values = st.lists(
    st.one_of(
        pieces,
        st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=6),
    ),
    max_size=8,
).map("".join)
READ_BACK = (
    'set -a; . ./pod.env; exec "$PYTHON" -c "import json, os, sys; '
    'json.dump({k: os.environ.get(k) for k in sys.argv[1:]}, sys.stdout)" "$@"'
)


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 60))  # a bash and a python per example
@given(env=st.dictionaries(keys, values, max_size=6))
def test_bash_sources_any_exported_environment_exactly_and_runs_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    for leftover in tmp_path.iterdir():
        leftover.unlink()
    write_export(tmp_path / "pod.env", env)
    done = subprocess.run(
        ["bash", "-c", READ_BACK, "bash", *env],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "PYTHON": sys.executable, "X": "interpolated"},
        capture_output=True,
        check=False,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    # os.environ decodes what the kernel holds as UTF-8 (surrogateescape): compare as bytes
    read = {k: os.fsencode(v) for k, v in json.loads(done.stdout).items()}
    assert read == {k: v.encode() for k, v in env.items()}
    assert not (tmp_path / "pwned").exists()


@FUZZ
@given(value=st.characters(categories=["Cs"]))
def test_values_that_are_not_unicode_text_are_refused_for_dotenv_and_kept_by_json(
    value: str, tmp_path: Path
) -> None:
    """A pod's JSON can carry a lone surrogate (\\ud800): no file or environment can hold it."""
    with pytest.raises(DotenvError, match="not text"):
        write_export(tmp_path / "pod.env", {"A": value})
    path = write_export(tmp_path / "pod.json", {"A": value}, "json")
    assert json.loads(path.read_text(encoding="utf-8")) == {"A": value}
