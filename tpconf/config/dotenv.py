"""The project's ``.env`` file: variables for ``${VAR}`` in telepresence.yaml, as docker compose
reads its own ``.env``.

It lives in the project directory (the directory of the first file:
:data:`~tpconf.config.loading.DOTENV_FILENAME`). Variables of the
environment win over it. The format is compose's: ``KEY=VALUE`` lines, blank lines and ``#``
comments, an optional ``export`` in front; a value is

- unquoted: up to the end of the line or a `` #`` comment, spaces around it removed;
- single-quoted: literal, possibly over several lines;
- double-quoted: ``\\n``, ``\\t``, ``\\\\``, ``\\"`` and ``\\$`` are escapes, possibly over
  several lines.

Unquoted and double-quoted values may use ``${VAR}`` (every form of
:mod:`~tpconf.config.interpolate`), from the environment and the lines above. Every problem is a
:class:`~tpconf.errors.ConfigError` at its ``.env:line:column``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tpconf.config.interpolate import InterpolationError, interpolate
from tpconf.errors import ConfigError, Position

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "$": "$$"}


class _Reader:
    def __init__(self, text: str, display: str, env: Mapping[str, str]) -> None:
        self.text = text
        self.display = display
        self.env = env
        self.pos = 0
        self.values: dict[str, str] = {}

    def where(self, pos: int) -> Position:
        head = self.text[:pos]
        return Position(self.display, head.count("\n") + 1, pos - (head.rfind("\n") + 1) + 1)

    def error(self, message: str, pos: int, hint: str | None = None) -> ConfigError:
        return ConfigError(message, position=self.where(pos), hint=hint)

    def line_end(self, pos: int) -> int:
        end = self.text.find("\n", pos)
        return len(self.text) if end < 0 else end

    def read(self) -> dict[str, str]:
        while self.pos < len(self.text):
            end = self.line_end(self.pos)
            line = self.text[self.pos : end]
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                self.pos = end + 1
                continue
            self.assignment(end)
        return self.values

    def assignment(self, end: int) -> None:
        start = self.pos + len(self.text[self.pos : end]) - len(self.text[self.pos : end].lstrip())
        equals = self.text.find("=", start, end)
        if equals < 0:
            raise self.error(
                "expected `KEY=VALUE`", start, hint="write one variable per line: `NAME=value`"
            )
        key = self.text[start:equals].strip()
        if key.startswith(("export ", "export\t")):
            key = key[len("export") :].strip()
        if not _KEY.fullmatch(key):
            raise self.error(f"`{key}` is not a valid variable name", start)
        value_start = equals + 1
        while value_start < end and self.text[value_start] in " \t":
            value_start += 1
        quote = self.text[value_start : value_start + 1]
        if quote in ("'", '"'):
            value, after = self.quoted(value_start, quote)
            rest_end = self.line_end(after)
            rest = self.text[after:rest_end].strip()
            if rest and not rest.startswith("#"):
                raise self.error("unexpected text after the closing quote", after)
            self.pos = rest_end + 1
            if quote == '"':
                value = self.interpolated(value, value_start)
        else:
            raw = self.text[value_start:end]
            comment = re.search(r"\s#", raw)
            raw = (raw[: comment.start()] if comment else raw).strip()
            value = self.interpolated(raw, value_start)
            self.pos = end + 1
        self.values[key] = value

    def quoted(self, start: int, quote: str) -> tuple[str, int]:
        out: list[str] = []
        pos = start + 1
        while pos < len(self.text):
            char = self.text[pos]
            if char == quote:
                return "".join(out), pos + 1
            if quote == '"' and char == "\\" and self.text[pos + 1 : pos + 2] in _ESCAPES:
                out.append(_ESCAPES[self.text[pos + 1]])
                pos += 2
                continue
            out.append(char)
            pos += 1
        raise self.error(f"the value quoted with {quote} is not closed", start)

    def interpolated(self, value: str, pos: int) -> str:
        try:
            return interpolate(value, {**self.values, **self.env})
        except InterpolationError as exc:
            raise self.error(exc.message, pos, exc.hint) from None


def parse_dotenv(text: str, display: str, env: Mapping[str, str]) -> dict[str, str]:
    """The variables of a ``.env`` file's ``text``; ``env`` (which wins over the file) is what
    its ``${VAR}`` references see, with the lines above. ``display`` names the file in errors."""
    return _Reader(text, display, env).read()
