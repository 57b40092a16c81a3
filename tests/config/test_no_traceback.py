"""Whatever the file holds, loading gives a Project or ConfigErrors: never another exception."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from tpconf.config import Project, parse_project
from tpconf.errors import ConfigError
from tpconf.methods import REGISTRY

KEYS = [
    "version",
    "deployments",
    "defaults",
    "vpn",
    "context",
    "namespace",
    "new",
    "swap",
    "existing",
    "method",
    "expose",
    "also-proxy",
    "volumes",
    "root",
    "mounts",
    "pod",
    "local",
    "read-only",
    "real-paths",
    "env",
    "set",
    "export",
    "file",
    "format",
    "run",
    "shell",
    "agent-image",
    "image",
    "deployment",
    "container",
    "pod-cidrs",
    "service-cidrs",
    "web",
    "a",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.sampled_from(
        [
            "inject-tcp",
            "vpn-tcp",
            "container",
            "8080",
            "8080:80",
            "1:2:3",
            "10.0.0.0/8",
            "::1",
            "db.example.com",
            "/var/run",
            "./x",
            ".env.json",
            "${X}",
            "${X:-d}",
            "$$",
            "${",
            "",
            "a",
        ]
    ),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=5),
    ),
    max_leaves=25,
)
DOCUMENTS = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, 2, "1", None])},
    optional={
        "deployments": st.dictionaries(
            st.sampled_from(["web", "a", "B", "1x"]), VALUES, max_size=3
        ),
        "defaults": VALUES,
        "vpn": VALUES,
        "namespace": SCALARS,
    },
)


def _load(text: str, tmp: Path) -> None:
    try:
        result = parse_project(text, base_dir=tmp, methods=REGISTRY, env={"X": "1"})
    except ConfigError as error:
        assert error.render()
        assert "Traceback" not in error.render()
    else:
        assert isinstance(result, Project)


def _dump(data: Any) -> str:
    import io

    stream = io.StringIO()
    YAML(typ="safe", pure=True).dump(data, stream)
    return stream.getvalue()


SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(
    text=st.text(alphabet=st.sampled_from(list("ab: -[]{}&*!|>'\"#%@`,?\n\t\\$01")), max_size=80)
)
def test_arbitrary_yaml_text_never_raises_anything_else(text: str, tmp_path: Path) -> None:
    _load(text, tmp_path)


@SETTINGS
@given(text=st.text(max_size=60))
def test_arbitrary_unicode_never_raises_anything_else(text: str, tmp_path: Path) -> None:
    _load(text, tmp_path)


@SETTINGS
@given(data=DOCUMENTS)
def test_arbitrary_mappings_never_raise_anything_else(data: dict[str, Any], tmp_path: Path) -> None:
    _load(_dump(data), tmp_path)


@SETTINGS
@given(data=VALUES)
def test_arbitrary_values_never_raise_anything_else(data: Any, tmp_path: Path) -> None:
    _load(_dump(data), tmp_path)
