"""Fuzzing the config loader with what a file on disk may hold beyond tests/config's text fuzz.

``tests/config/test_no_traceback.py`` feeds text and generated mappings; here the loader gets raw
bytes (any encoding, a BOM, invalid UTF-8), YAML aliases that expand exponentially ("billion
laughs"), deep nesting, and generated documents using every method and operation. Whatever it
is, loading returns a Project or raises ConfigError (rendered without a traceback), in bounded
time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.config.test_no_traceback import DOCUMENTS, VALUES, _dump
from tests.fuzz.conftest import FUZZ
from tpconf.config import Project, parse_project
from tpconf.errors import ConfigError
from tpconf.methods import REGISTRY

pytestmark = pytest.mark.timeout(180)


def _load(data: str | bytes, tmp: Path) -> None:
    try:
        result = parse_project(data, base_dir=tmp, methods=REGISTRY, env={"X": "1"})
    except ConfigError as error:
        assert error.render()
        assert "Traceback" not in error.render()
    else:
        assert isinstance(result, Project)


@FUZZ
@given(data=st.binary(max_size=200))
def test_any_bytes_load_or_fail_as_config_errors(data: bytes, tmp_path: Path) -> None:
    _load(data, tmp_path)


@FUZZ
@given(data=DOCUMENTS, encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]))
def test_documents_in_any_encoding_load_or_fail_as_config_errors(
    data: dict[str, object], encoding: str, tmp_path: Path
) -> None:
    _load(_dump(data).encode(encoding, errors="replace"), tmp_path)


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 20))  # each builds up to 100,000 values
@given(depth=st.integers(1, 12), width=st.integers(2, 12))
def test_alias_bombs_are_refused_or_loaded_in_bounded_time(
    depth: int, width: int, tmp_path: Path
) -> None:
    lines = ["a0: &a0 [x]"]
    for level in range(1, depth + 1):
        refs = ", ".join(f"*a{level - 1}" for _ in range(width))
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines.append(f"deployments: {{web: {{new: true, run: *a{depth}}}}}")
    _load("version: 1\n" + "\n".join(lines) + "\n", tmp_path)


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 30))
@given(depth=st.integers(1, 3000), opener=st.sampled_from(["[", "{a: "]))
def test_deep_nesting_loads_or_fails_as_a_config_error(
    depth: int, opener: str, tmp_path: Path
) -> None:
    closer = "]" if opener == "[" else "}"
    _load(f"version: 1\ndeployments: {opener * depth}1{closer * depth}\n", tmp_path)


methods = st.sampled_from(sorted(REGISTRY))
operations = st.one_of(
    st.just({"new": True}),
    st.builds(lambda d: {"swap": d}, st.sampled_from([True, "web", "", 1])),
    st.builds(lambda d: {"existing": d}, st.sampled_from(["web", True, None])),
    st.builds(lambda d: {"intercept": d}, VALUES),
)


@FUZZ
@given(
    method=methods,
    operation=operations,
    extra=st.dictionaries(
        st.sampled_from(
            ["env", "expose", "run", "volumes", "shell", "to-pod", "from-pod", "also-proxy"]
        ),
        VALUES,
        max_size=4,
    ),
)
def test_deployments_of_every_method_and_operation_load_or_fail_as_config_errors(
    method: str, operation: dict[str, object], extra: dict[str, object], tmp_path: Path
) -> None:
    document = {"version": 1, "deployments": {"web": {"method": method, **operation, **extra}}}
    _load(_dump(document), tmp_path)
