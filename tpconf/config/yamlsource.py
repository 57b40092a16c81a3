"""Reading telepresence.yaml: bytes to plain Python data, with the position of every key and value.

ruamel.yaml composes the document into nodes that keep their line and column; this module turns
the nodes into dicts, lists and scalars itself, so it can reject what a config file must not
contain (duplicate keys, unsupported tags, alias bombs) and record, for every path such as
``("deployments", "web", "expose", 1)``, where its key and its value are. Interpolation of
``${VAR}`` happens here too, because its errors need the position of the scalar.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

from tpconf.config.interpolate import InterpolationError, interpolate
from tpconf.errors import ConfigError, ConfigErrors, Position

#: Files larger than this are refused: a telepresence.yaml is a few kilobytes, and a bigger file
#: is almost certainly the wrong file (or a generated one that should not be watched).
MAX_FILE_SIZE = 1024 * 1024

#: Upper bound on the values built from one file, aliases expanded: stops "billion laughs".
MAX_NODES = 100_000

#: A path into the document: mapping keys and sequence indexes, from the root.
DocPath = tuple[str | int, ...]

_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_CORE}{t}" for t in ("null", "bool", "int", "float")}


@dataclass
class Locator:
    """The positions of the keys and values of one parsed file."""

    file: str
    keys: dict[DocPath, Position] = field(default_factory=dict)
    values: dict[DocPath, Position] = field(default_factory=dict)

    def key(self, path: DocPath) -> Position:
        """Where the key of ``path`` is written (its value's position for sequence items)."""
        for end in range(len(path), -1, -1):
            prefix = path[:end]
            if prefix in self.keys:
                return self.keys[prefix]
            if prefix in self.values:
                return self.values[prefix]
        return Position(self.file, 1, 1)

    def value(self, path: DocPath) -> Position:
        """Where the value of ``path`` is written, or of its nearest written ancestor."""
        for end in range(len(path), -1, -1):
            prefix = path[:end]
            if prefix in self.values:
                return self.values[prefix]
        return Position(self.file, 1, 1)

    def has(self, path: DocPath) -> bool:
        """Whether ``path`` is written in the file."""
        return path in self.values


def read_source(path: Path, display: str) -> bytes:
    """Read the file at ``path``; ``display`` is how messages name it."""
    where = Position(display)
    try:
        if path.is_dir():
            raise ConfigError(
                "is a directory, not a file",
                position=where,
                hint=f"pass the file inside it: `-f {Path(display) / 'telepresence.yaml'}`",
            )
        with path.open("rb") as stream:
            data = stream.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(
            "file not found",
            position=where,
            hint="create it (`tpconf init` writes one), or pass another with -f",
        ) from None
    except PermissionError:
        raise ConfigError(
            "cannot read the file: permission denied", position=where, hint="check its mode"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", position=where) from None
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(
            f"file is larger than {MAX_FILE_SIZE // 1024} KiB",
            position=where,
            hint="is this the right file? a telepresence.yaml is a few kilobytes",
        )
    return data


def decode(data: bytes, display: str) -> str:
    """Decode UTF-8 (a BOM is allowed); a bad byte is reported at its line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        head = data[: exc.start]
        line = head.count(b"\n") + 1
        line_start = head.rfind(b"\n") + 1
        column = len(head[line_start:].decode("utf-8-sig", errors="replace")) + 1
        raise ConfigError(
            f"file is not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded",
            position=Position(display, line, column),
            hint="save the file as UTF-8",
        ) from None


def _tab_in_indent(text: str, display: str, up_to_line: int) -> ConfigError | None:
    for number, line in enumerate(text.splitlines()[:up_to_line], start=1):
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent:
            return ConfigError(
                "tab character used for indentation",
                position=Position(display, number, indent.index("\t") + 1),
                hint="YAML indentation must use spaces; replace the tab with spaces",
            )
    return None


def _syntax_error(exc: YAMLError, text: str, display: str) -> ConfigError:
    if isinstance(exc, ReaderError):
        head = text[: exc.position]
        line = head.count("\n") + 1
        column = exc.position - (head.rfind("\n") + 1) + 1
        char = exc.character
        code = char if isinstance(char, int) else ord(str(char)[:1] or "\0")
        return ConfigError(
            f"invalid YAML: control character U+{code:04X} is not allowed",
            position=Position(display, line, column),
            hint="remove the control character",
        )
    if isinstance(exc, MarkedYAMLError) and exc.problem_mark is not None:
        line, column = exc.problem_mark.line + 1, exc.problem_mark.column + 1
        tab = _tab_in_indent(text, display, line)
        if tab is not None:
            return tab
        problem = exc.problem or "syntax error"
        if exc.context:
            problem = f"{problem} ({exc.context})"
        if "another document" in problem:
            problem = "the file holds more than one YAML document"
            return ConfigError(
                f"invalid YAML: {problem}",
                position=Position(display, line, column),
                hint="remove the `---` separator and merge the documents",
            )
        return ConfigError(f"invalid YAML: {problem}", position=Position(display, line, column))
    return ConfigError(f"invalid YAML: {exc}", position=Position(display))


def parse_yaml(
    text: str, display: str, env: Mapping[str, str] | None = None, *, allow_empty: bool = False
) -> tuple[Any, Locator]:
    """Parse one YAML document into plain data, interpolating ``${VAR}`` from ``env``.

    Raises :class:`ConfigError` (or :class:`ConfigErrors`) for an empty file (unless
    ``allow_empty``: an override file of comments only changes nothing, and is ``None``), a
    syntax error, duplicate keys, unsupported tags and unset variables.
    """
    yaml = YAML(typ="safe", pure=True)
    try:
        root = yaml.compose(io.StringIO(text))
    except YAMLError as exc:
        raise _syntax_error(exc, text, display) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", position=Position(display)) from None
    if root is None:
        if allow_empty:
            return None, Locator(display)
        raise ConfigError(
            "file is empty",
            position=Position(display, 1, 1),
            hint="start with `version: 1` and a `deployments:` mapping (`tpconf init` writes one)",
        )
    builder = _Builder(display, os.environ if env is None else env, yaml)
    try:
        data = builder.build(root, ())
    except RecursionError:  # ruamel composes deeper than the builder can walk (issue 11 fuzz)
        raise ConfigError("invalid YAML: nested too deeply", position=Position(display)) from None
    if builder.errors:
        raise ConfigErrors(builder.errors) if len(builder.errors) > 1 else builder.errors[0]
    return data, builder.locator


def _pos(display: str, node: Node) -> Position:
    return Position(display, node.start_mark.line + 1, node.start_mark.column + 1)


class _Builder:
    def __init__(self, display: str, env: Mapping[str, str], yaml: YAML) -> None:
        self.display = display
        self.env = env
        self.yaml = yaml
        self.locator = Locator(display)
        self.errors: list[ConfigError] = []
        self.count = 0
        self.active: set[int] = set()

    def error(self, message: str, node: Node, path: DocPath, hint: str | None = None) -> None:
        self.errors.append(
            ConfigError(message, position=_pos(self.display, node), loc=format_loc(path), hint=hint)
        )

    def build(self, node: Node, path: DocPath) -> Any:
        self.count += 1
        if self.count == MAX_NODES:
            self.error("too many values (aliases expand to more than 100000)", node, path)
        if self.count >= MAX_NODES:
            return None
        self.locator.values.setdefault(path, _pos(self.display, node))
        if id(node) in self.active:
            self.error("an alias refers to the mapping or list that contains it", node, path)
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self.mapping(node, path)
            if isinstance(node, SequenceNode):
                return self.sequence(node, path)
            return self.scalar(node, path)
        finally:
            self.active.discard(id(node))

    def unsupported_tag(self, node: Node, path: DocPath) -> bool:
        tag = str(node.tag)
        expected = f"{_CORE}map" if isinstance(node, MappingNode) else f"{_CORE}seq"
        if tag != expected:
            shown = tag.replace(_CORE, "!!")
            self.error(f"YAML tag `{shown}` is not supported", node, path, "remove the tag")
            return True
        return False

    def sequence(self, node: SequenceNode, path: DocPath) -> list[Any]:
        if self.unsupported_tag(node, path):
            return []
        return [self.build(item, (*path, index)) for index, item in enumerate(node.value)]

    def key_of(self, node: Node, path: DocPath) -> str | None:
        if isinstance(node, ScalarNode):
            return str(node.value)
        self.error("a key must be a plain string, not a list or mapping", node, path)
        return None

    def mapping(self, node: MappingNode, path: DocPath) -> dict[str, Any]:
        if self.unsupported_tag(node, path):
            return {}
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        merges: list[tuple[Node, Node]] = []
        for key_node, value_node in node.value:
            if str(key_node.tag) == f"{_CORE}merge":
                merges.append((key_node, value_node))
                continue
            key = self.key_of(key_node, path)
            if key is None:
                continue
            child = (*path, key)
            if key in first_line:
                self.error(
                    f"duplicate key `{key}` (first defined on line {first_line[key]})",
                    key_node,
                    child,
                    hint="remove one of them",
                )
                continue
            first_line[key] = key_node.start_mark.line + 1
            self.locator.keys[child] = _pos(self.display, key_node)
            result[key] = self.build(value_node, child)
        for key_node, value_node in merges:
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in sources:
                if not isinstance(source, MappingNode):
                    self.error("`<<` must merge a mapping or a list of mappings", key_node, path)
                    continue
                for sub_key_node, sub_value_node in source.value:
                    key = self.key_of(sub_key_node, path)
                    if key is None or key in result:
                        continue
                    child = (*path, key)
                    self.locator.keys[child] = _pos(self.display, sub_key_node)
                    result[key] = self.build(sub_value_node, child)
        return result

    def scalar(self, node: Node, path: DocPath) -> Any:
        tag = str(node.tag)
        if tag == f"{_CORE}str":
            try:
                return interpolate(str(node.value), self.env)
            except InterpolationError as exc:
                self.error(exc.message, node, path, exc.hint)
                return str(node.value)
        if tag == f"{_CORE}timestamp":
            return str(node.value)
        if tag in _SCALAR_TAGS:
            try:
                return self.yaml.constructor.construct_object(node, deep=True)
            except (ValueError, TypeError, YAMLError):
                self.error(f"`{node.value}` is not a valid {tag.removeprefix(_CORE)}", node, path)
                return None
        shown = tag.replace(_CORE, "!!")
        self.error(
            f"YAML tag `{shown}` is not supported", node, path, "remove the tag, or quote the value"
        )
        return None


def merge(base: Any, base_at: Locator, over: Any, over_at: Locator) -> tuple[Any, Locator]:
    """``over`` (an override file) merged into ``base``, as docker compose merges its files.

    Mappings are merged key by key; anything else (a list, a scalar, a mapping over a scalar) is
    replaced whole. The positions follow the values: what ``over`` wrote is found in its file,
    the rest in the base's, so an error names the file its value came from. ``over`` ``None``
    (an empty file) changes nothing.
    """
    if over is None:
        return base, base_at
    at = Locator(base_at.file, dict(base_at.keys), dict(base_at.values))
    return _merge(base, over, (), at, over_at), at


def _merge(base: Any, over: Any, path: DocPath, at: Locator, over_at: Locator) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            child = (*path, key)
            merged[key] = (
                _merge(merged[key], value, child, at, over_at)
                if key in merged
                else _replace(value, child, at, over_at)
            )
            if child in over_at.keys:
                at.keys[child] = over_at.keys[child]
        return merged
    return _replace(over, path, at, over_at)


def _replace(value: Any, path: DocPath, at: Locator, over_at: Locator) -> Any:
    """``value`` of ``over`` at ``path``: the positions below ``path`` become its file's."""
    depth = len(path)
    for table, source in ((at.keys, over_at.keys), (at.values, over_at.values)):
        for stale in [p for p in table if p[:depth] == path and (p != path or table is at.values)]:
            del table[stale]
        table.update((p, pos) for p, pos in source.items() if p[:depth] == path)
    return value


def format_loc(path: DocPath) -> str:
    """``("deployments", "web", "expose", 1)`` -> ``deployments.web.expose[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part and all(c.isalnum() or c in "-_" for c in part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def dump_yaml(data: Any) -> str:
    """``data`` (plain dicts, lists and scalars) as block-style YAML, keys in their order."""
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()
