"""The committed schema and docs are current, every field is documented, every example is valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tpconf.config import load_project
from tpconf.config.schema import DOCS_PATH, SCHEMA_PATH, docs_text, json_schema, schema_text
from tpconf.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("examples/*/telepresence.yaml"))
ALL_FILES = [ROOT / "telepresence.yaml", *EXAMPLES]
STALE = "schema is out of date: run `make schema` and commit"


def test_the_committed_schema_is_current() -> None:
    assert (ROOT / SCHEMA_PATH).read_text(encoding="utf-8") == schema_text(REGISTRY), STALE


def test_the_committed_docs_are_current() -> None:
    assert (ROOT / DOCS_PATH).read_text(encoding="utf-8") == docs_text(REGISTRY), STALE


def _properties(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    models = {"(top level)": schema, **schema["$defs"]}
    return [
        (f"{model}.{key}", prop)
        for model, body in models.items()
        for key, prop in body.get("properties", {}).items()
    ]


def test_every_field_has_a_description_ending_with_a_period() -> None:
    schema = json_schema(REGISTRY)
    props = _properties(schema)
    assert len(props) > 30
    for name, prop in props:
        description = prop.get("description", "")
        assert description, f"{name} has no description (an attribute docstring)"
        assert description.endswith("."), f"description of {name} does not end with a period"
    for name, body in schema["$defs"].items():
        assert body.get("description", "").endswith("."), f"model {name} has no docstring"


def test_the_schema_has_its_identity() -> None:
    schema = json.loads(schema_text(REGISTRY))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "telepresence.yaml"
    assert schema["$id"]
    assert schema["additionalProperties"] is False


def test_there_are_the_five_examples() -> None:
    names = {path.parent.name for path in EXAMPLES}
    assert {"quickstart", "expose", "multi-service", "vpn-also-proxy", "volumes"} <= names


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_validates_without_warnings(path: Path) -> None:
    project = load_project(path, methods=REGISTRY, env={})
    assert project.deployments
    assert project.warnings == ()


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_points_at_the_schema(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix)
    target = (path.parent / first.removeprefix(prefix)).resolve()
    assert target == ROOT / SCHEMA_PATH


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_matches_the_json_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from tpconf.config.yamlsource import parse_yaml

    data, _ = parse_yaml(path.read_text(encoding="utf-8"), str(path), env={})
    jsonschema.validate(data, json_schema(REGISTRY))


def test_the_demo_is_the_quickstart() -> None:
    spec = load_project(ROOT / "telepresence.yaml", methods=REGISTRY, env={}).deployment(
        "quickstart"
    )
    assert spec.run == "curl -s http://helloworld.default"
    assert spec.method == "inject-tcp"
    assert spec.namespace == "default"


def test_every_model_of_the_schema_has_its_section_in_the_docs() -> None:
    # A type column links to `#model`: a model without its section is a dead link.
    docs = docs_text(REGISTRY)
    for name in json_schema(REGISTRY)["$defs"]:
        assert f"\n## {name}\n" in docs, f"docs/configuration.md has no section for {name}"
