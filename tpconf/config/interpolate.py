"""``${VAR}`` interpolation in the string values of telepresence.yaml.

The rules are docker compose's, reduced to the two forms that matter:

- ``${VAR}`` is replaced by the value of ``VAR``; an unset variable is an error that names it;
- ``${VAR:-default}`` is replaced by ``default`` when ``VAR`` is unset or empty;
- ``$$`` is a literal ``$``; a ``$`` followed by anything else is kept as it is.

Keys are never interpolated, only string values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_TOKEN = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<body>[^}]*)\}|(?P<open>\{))")
_BODY = re.compile(rf"(?P<name>{_NAME})(?::-(?P<default>.*))?", re.DOTALL)


class InterpolationError(ValueError):
    """Raised when a ``${...}`` reference cannot be replaced; the message names the variable."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Replace the ``${VAR}`` and ``${VAR:-default}`` references of ``text`` from ``env``."""
    if "$" not in text:
        return text
    out: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(text):
        out.append(text[pos : match.start()])
        pos = match.end()
        if match["dollar"] is not None:
            out.append("$")
            continue
        if match["open"] is not None:
            raise InterpolationError(
                "`${` is not closed by `}`",
                hint="write `${VAR}`, or `$${` for a literal `${`",
            )
        body = match["body"]
        parsed = _BODY.fullmatch(body)
        if parsed is None:
            raise InterpolationError(
                f"`${{{body}}}` is not a valid variable reference",
                hint="write `${VAR}` or `${VAR:-default}`, or `$$` for a literal `$`",
            )
        name, default = parsed["name"], parsed["default"]
        value = env.get(name)
        if default is not None:
            out.append(value if value else default)
        elif value is None:
            raise InterpolationError(
                f"environment variable `{name}` is not set",
                hint=f"set `{name}`, or give a default: `${{{name}:-value}}`",
            )
        else:
            out.append(value)
    out.append(text[pos:])
    return "".join(out)
