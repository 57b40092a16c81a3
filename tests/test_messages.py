"""Messages and hints name only keys that exist: a hint that says `operation: swap` when the file
has no `operation` key sends a user nowhere (issue 10).

Scope: every string literal that tpconf passes as a ``hint=``, or as the message of an error or
warning it raises or reports, read from the source with :mod:`ast`. A backticked span that
starts with a key (``key:``, ``key: value``) or is a dotted key path (``env.export``) must name
keys of the JSON schema.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tpconf.config.schema import json_schema
from tpconf.methods import REGISTRY

PACKAGE = Path(__file__).resolve().parent.parent / "tpconf"

#: Calls whose string arguments are shown to users: errors, warnings, reports.
_SHOWN = re.compile(r"(Error|Errors|Failed|Forbidden|NotFound|Unreachable|Swapped|Timeout)$")
_REPORTS = {"custom_error", "error", "warn", "BadValue", "Explanation", "notice"}

_KEY_THEN_COLON = re.compile(r"^([a-z][a-z0-9]*(?:-[a-z0-9]+)*):(?:\s|$)")
_DOTTED = re.compile(r"^[a-z][a-z0-9-]*(?:\.[a-z][a-z0-9-]*)+$")


def _schema_keys(node: Any, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                found.update(value)
            _schema_keys(value, found)
    elif isinstance(node, list):
        for item in node:
            _schema_keys(item, found)
    return found


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _strings(node: ast.AST) -> Iterator[str]:
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            yield child.value


def shown_strings() -> Iterator[tuple[str, str]]:
    """(file:line, text) of every string literal a user can see in a message or hint."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno}"
            for keyword in call.keywords:
                if keyword.arg == "hint":
                    yield from ((where, s) for s in _strings(keyword.value))
            name = _name(call.func)
            if (_SHOWN.search(name) or name in _REPORTS) and call.args:
                for arg in call.args:
                    yield from ((where, s) for s in _strings(arg))


def referenced_keys(text: str, keys: set[str]) -> list[str]:
    """The keys a message names in backticks: ``key: value``, or a path ``a.b`` that starts
    with a key of the file (``db.example.com`` is a value, not a path)."""
    found: list[str] = []
    for span in re.findall(r"`([^`]+)`", text):
        match = _KEY_THEN_COLON.match(span)
        if match:
            found.append(match.group(1))
        elif _DOTTED.match(span) and span.split(".")[0] in keys:
            found.extend(span.split("."))
    return found


def test_the_scanner_finds_what_it_must_check() -> None:
    text = "use `operation: swap`, `env.export` or `env.exports`, not `tpconf down` `a.b.com`"
    assert referenced_keys(text, {"env", "export"}) == [
        "operation",
        "env",
        "export",
        "env",
        "exports",
    ]
    assert sum(1 for _ in shown_strings()) > 100


def test_every_key_named_in_a_message_or_hint_exists_in_the_schema() -> None:
    keys = _schema_keys(json_schema(REGISTRY), set())
    unknown = [
        f"{where}: `{key}` in {text!r}"
        for where, text in shown_strings()
        for key in referenced_keys(text, keys)
        if key not in keys
    ]
    assert not unknown, "messages name keys the file does not have:\n" + "\n".join(unknown)
