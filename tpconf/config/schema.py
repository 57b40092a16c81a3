"""The JSON schema and docs/configuration.md, generated from the models.

``tpconf schema`` writes both; a test fails when the committed copies are stale. The attribute
docstrings of :mod:`tpconf.config.models` are the single source of the text, with one exception:
the valid values of `method` and their descriptions come from the method registry the caller
passes in (each method's ``summary``), so a new method documents itself.

The attribute docstrings are read here, from the models' source, and not by pydantic
(``use_attribute_docstrings``): pydantic would parse that source at every start, a tenth of
``tpconf validate``'s time, for text only the schema and the docs print.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import json
import sys
from typing import Any

from pydantic import BaseModel

from tpconf.config import models
from tpconf.config.methods import MethodCatalog
from tpconf.config.models import TelepresenceFile

SCHEMA_ID = "urn:tpconf:schema:telepresence.yaml:v1"
SCHEMA_PATH = "schemas/telepresence.schema.json"
DOCS_PATH = "docs/configuration.md"

#: Models in the order the reference documents them, top-down.
_DOC_ORDER = (
    "TelepresenceFile",
    "Deployment",
    "Defaults",
    "New",
    "Swap",
    "Existing",
    "Intercept",
    "HeaderRegex",
    "Volumes",
    "Mount",
    "Env",
    "EnvExport",
    "Vpn",
)


def json_schema(methods: MethodCatalog) -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of telepresence.yaml."""
    body = TelepresenceFile.model_json_schema(by_alias=True, mode="validation")
    _add_attribute_docstrings(body)
    for model in body.get("$defs", {}).values():
        prop = model.get("properties", {}).get("method")
        if prop is not None:
            _document_methods(prop, methods)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **body,
        "title": "telepresence.yaml",
    }


def _add_attribute_docstrings(body: dict[str, Any]) -> None:
    """Each property without a ``description`` gets its field's attribute docstring."""
    classes = {
        name: value
        for name, value in vars(models).items()
        if isinstance(value, type) and issubclass(value, BaseModel)
    }
    for name, model in [(TelepresenceFile.__name__, body), *body.get("$defs", {}).items()]:
        cls = classes.get(name)
        if cls is None:
            continue
        docs = attribute_docstrings(cls)
        for field_name, field in cls.model_fields.items():
            prop = model.get("properties", {}).get(field.alias or field_name)
            if prop is not None and "description" not in prop and field_name in docs:
                keyed = sorted({**prop, "description": docs[field_name]}.items())
                prop.clear()
                prop.update(keyed)  # pydantic's order: keys sorted


def attribute_docstrings(cls: type[BaseModel]) -> dict[str, str]:
    """The string literal under each annotated attribute of ``cls`` and its bases, by name.

    The same text pydantic's ``use_attribute_docstrings`` reads (cleaned like a docstring); a
    subclass's own docstring for a name wins over its base's.
    """
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if not (isinstance(base, type) and issubclass(base, BaseModel)) or base is BaseModel:
            continue
        node = _top_level_classes(base.__module__).get(base.__qualname__)
        for field, after in itertools.pairwise(node.body if node is not None else []):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[field.target.id] = inspect.cleandoc(after.value.value)
    return docs


@functools.cache
def _top_level_classes(module: str) -> dict[str, ast.ClassDef]:
    """The classes defined at the top of ``module``, parsed once (``inspect.getsource`` of a
    class parses its whole module again each time)."""
    tree = ast.parse(inspect.getsource(sys.modules[module]))
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _document_methods(prop: dict[str, Any], methods: MethodCatalog) -> None:
    """The `method` property lists the registry's methods: as an enum, and in its description."""
    prop["enum"] = list(methods)
    described = [f"`{name}` ({rules.summary.rstrip('.')})" for name, rules in methods.items()]
    listing = (
        ", ".join(described[:-1]) + f" and {described[-1]}"
        if len(described) > 1
        else "".join(described)
    )
    head, _, tail = prop.get("description", "").partition(" Defaults to")
    prop["description"] = f"{head} Valid values are {listing}." + (
        f" Defaults to{tail}" if tail else ""
    )


def schema_text(methods: MethodCatalog) -> str:
    """The schema as committed: sorted keys are not used, field order is the models'."""
    return json.dumps(json_schema(methods), indent=2, ensure_ascii=False) + "\n"


def _type_text(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in prop:
        return " or ".join(_type_text(p) for p in prop["anyOf"])
    if "enum" in prop:
        return " or ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    kind = prop.get("type")
    if kind == "array":
        return f"list of {_type_text(prop.get('items', {}))}"
    if kind == "object":
        extra = prop.get("additionalProperties")
        return f"mapping of {_type_text(extra)}" if isinstance(extra, dict) else "mapping"
    names = {"integer": "integer", "string": "string", "boolean": "boolean", "null": "null"}
    return names.get(str(kind), "any")


def _default_text(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in prop or isinstance(prop["default"], dict):
        return ""  # a model's defaults are in its own section
    return f"`{json.dumps(prop['default'])}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_INTRO = """\
# telepresence.yaml reference

<!-- Generated by `tpconf schema` from tpconf/config/models.py: do not edit. -->

`telepresence.yaml` declares the Kubernetes deployments proxied to this machine. tpconf looks for
it in the current directory and then in its parents (`-f FILE` picks another). Keys are
kebab-case; unknown keys are errors.

```yaml
# yaml-language-server: $schema=schemas/telepresence.schema.json
version: 1
deployments:
  quickstart:
    new: true
    run: curl -s http://helloworld.default
```

## Editor support

The first line above points [yaml-language-server](https://github.com/redhat-developer/yaml-language-server)
(VS Code's YAML extension, and others) at the JSON schema, for completion and hover text; the path
is relative to the YAML file. The schema ships with tpconf: `tpconf schema --print` prints it, and
the file `tpconf init` writes points at `.tpconf/telepresence.schema.json`, which `tpconf init`
and `tpconf up` keep current.

## Personal overrides

`telepresence.override.yaml` beside the file, when it exists, is merged over it: mappings key by
key, lists (such as `expose` or `run` as a list) and values replaced whole. Keep it out of git
(`tpconf init` adds it to `.gitignore`): it is where a person sets their own context, ports or
commands. `-f FILE` reads FILE instead of telepresence.yaml and no override file; `-f` may be
repeated, each file merged over the ones before it. `--context` and `--namespace` (`-n`) set the
top-level `context` and `namespace` over every file. `tpconf config` prints the result; every
error names the file it is in.

## Environment variables

String values may use `${VAR}`, replaced by the value of the environment variable `VAR` (an
unset variable is an error naming it); `${VAR:-default}`, replaced by `default` when `VAR` is
unset or empty (`${VAR-default}`: only when unset); and `${VAR:?message}`, an error saying
`message` when `VAR` is unset or empty (`${VAR?message}`: only when unset). `$$` is a literal
`$`. Keys are not interpolated. For example, `context: ${KUBE_CONTEXT:-}` uses `$KUBE_CONTEXT`
when set, else the current context.

Variables that the environment does not set are read from `.env` in the project directory (the
directory of the file), as docker compose reads it: `NAME=value` lines, `#` comments, values
quoted with `'` (literal) or `"` (escapes such as `\n`, and `${VAR}`).

## Profiles and subsets

`tpconf up` starts every deployment that has no `profiles`, and those with a profile that is
active: `--profile NAME` (repeatable) or `$TPCONF_PROFILES` (comma-separated). Deployments named
on the command line (`tpconf up api web`) start whatever their profiles. `status`, `down`,
`logs`, `plan` and `config` take names too.

## Defaults

A key set in `defaults` applies to every deployment that does not set it. A deployment's own
value replaces the default value of that key entirely (mappings such as `env` and `volumes` are
not merged). `namespace` and `context` are set at the top level instead.

## Errors and warnings

Every problem in the file is reported at once as `FILE:LINE:COLUMN: KEY: message`, with a hint.
Warnings (a remote port below 1024, `also-proxy` with `inject-tcp`) do not stop tpconf.
"""


def docs_text(methods: MethodCatalog) -> str:
    """docs/configuration.md: an introduction, then one section per model."""
    schema = json_schema(methods)
    defs: dict[str, Any] = dict(schema.get("$defs", {}))
    defs["TelepresenceFile"] = schema
    lines = [_INTRO]
    for name in _DOC_ORDER:
        model = defs[name]
        title = "Top level" if name == "TelepresenceFile" else name
        lines.append(f"## {title}\n")
        lines.append(f"{model.get('description', '')}\n")
        lines.append("| Key | Type | Default | Description |")
        lines.append("|---|---|---|---|")
        required = set(model.get("required", []))
        for key, prop in model.get("properties", {}).items():
            lines.append(
                f"| `{key}` | {_escape(_type_text(prop))} | "
                f"{_escape(_default_text(prop, key in required))} | "
                f"{_escape(prop.get('description', ''))} |"
            )
        lines.append("")
    return "\n".join(lines)
