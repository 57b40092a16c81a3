"""``${VAR}`` interpolation in the string values of telepresence.yaml (and of ``.env``).

The rules are docker compose's:

- ``${VAR}`` is replaced by the value of ``VAR``; an unset variable is an error that names it;
- ``${VAR:-default}`` is replaced by ``default`` when ``VAR`` is unset or empty, ``${VAR-default}``
  only when it is unset;
- ``${VAR:?message}`` is an error saying ``message`` when ``VAR`` is unset or empty,
  ``${VAR?message}`` only when it is unset: a file says what a person must set, and why;
- ``$$`` is a literal ``$``; a ``$`` followed by anything else is kept as it is.

Keys are never interpolated, only string values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_TOKEN = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<body>[^}]*)\}|(?P<open>\{))")
_BODY = re.compile(rf"(?P<name>{_NAME})(?:(?P<op>:?[-?])(?P<arg>.*))?", re.DOTALL)


class InterpolationError(ValueError):
    """Raised when a ``${...}`` reference cannot be replaced; the message names the variable."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def _required(name: str, message: str, *, empty_too: bool) -> InterpolationError:
    state = "not set" if not empty_too else "not set or empty"
    text = message.strip() or f"environment variable `{name}` is {state}"
    return InterpolationError(
        text if not message.strip() else f"`{name}` is {state}: {text}",
        hint=f"set `{name}` in the environment or in the project's `.env` file",
    )


def _replace(name: str, op: str | None, arg: str, env: Mapping[str, str]) -> str:
    value = env.get(name)
    match op:
        case None:
            if value is None:
                raise InterpolationError(
                    f"environment variable `{name}` is not set",
                    hint=f"set `{name}` (the environment or the project's `.env` file), or give "
                    f"a default: `${{{name}:-value}}`",
                )
            return value
        case ":-":
            return value if value else arg
        case "-":
            return arg if value is None else value
        case ":?":
            if not value:
                raise _required(name, arg, empty_too=True)
            return value
        case "?":
            if value is None:
                raise _required(name, arg, empty_too=False)
            return value
    raise AssertionError(op)  # the pattern allows no other operator


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Replace the ``${...}`` references of ``text`` from ``env`` (see the module docstring)."""
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
                hint="write `${VAR}`, `${VAR:-default}` or `${VAR:?message}`, or `$$` for a "
                "literal `$`",
            )
        out.append(_replace(parsed["name"], parsed["op"], parsed["arg"] or "", env))
    out.append(text[pos:])
    return "".join(out)
