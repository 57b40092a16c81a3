"""The environment of a deployment's local process, and the files ``env.export`` writes.

Precedence, lowest first (Telepresence 1's order, with the file's overrides on top):

1. the local environment of ``tpconf`` (so ``PATH``, ``HOME``, ``TERM`` … keep working);
2. the pod's environment, except ``HOME``, ``PATH`` and ``HOSTNAME``, which describe the
   container and would break a local program (Telepresence 1 removed the same three);
3. ``TELEPRESENCE_POD``, ``TELEPRESENCE_CONTAINER``, ``TELEPRESENCE_MOUNTS`` (the pod's mount
   points joined with ``:``) and ``TELEPRESENCE_ROOT`` (only when the volumes are mounted, as
   Telepresence 1 set it only after mounting);
4. the file's overrides (``env.set``), which win over everything, ``TELEPRESENCE_*`` included.

:func:`pod_environment` is layers 2-4: what ``env.export`` and ``tpconf env NAME`` show.
:func:`process_environment` puts layer 1 below it.

The dotenv writer differs from Telepresence 1 on purpose: v1 wrote values unquoted and skipped
multi-line ones; here every value is double-quoted and escaped as Docker Compose reads it, so
multi-line values, quotes and ``$`` survive.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

__all__ = [
    "EXCLUDED_POD_VARIABLES",
    "ExportFormat",
    "from_dotenv",
    "pod_environment",
    "process_environment",
    "telepresence_variables",
    "to_dotenv",
    "to_json",
    "write_export",
]

#: Pod variables that describe the container rather than the application.
EXCLUDED_POD_VARIABLES = frozenset({"HOME", "PATH", "HOSTNAME"})

ExportFormat = Literal["dotenv", "json"]

#: Keys a dotenv file can hold: letters, digits, ``_``, ``.`` and ``-``, not starting with a
#: digit, ``.`` or ``-``. Kubernetes allows a few more; those can only be exported as JSON.
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")

_ESCAPES = {"\\": "\\\\", '"': '\\"', "$": "\\$", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", '"': '"', "$": "$", "n": "\n", "r": "\r", "t": "\t"}


def telepresence_variables(
    *,
    pod: str,
    container: str,
    root: str | None = None,
    mounts: Iterable[str] = (),
) -> dict[str, str]:
    """The ``TELEPRESENCE_*`` variables, as Telepresence 1 set them.

    ``mounts`` are the pod's mount points (absolute paths in the pod, duplicates dropped, order
    kept). ``root`` is the local directory they are mounted under; without it (volumes not
    mounted) ``TELEPRESENCE_ROOT`` is left out.
    """
    variables = {
        "TELEPRESENCE_POD": pod,
        "TELEPRESENCE_CONTAINER": container,
        "TELEPRESENCE_MOUNTS": ":".join(dict.fromkeys(mounts)),
    }
    if root is not None:
        variables["TELEPRESENCE_ROOT"] = root
    return variables


def pod_environment(
    pod_env: Mapping[str, str],
    *,
    pod: str,
    container: str,
    root: str | None = None,
    mounts: Iterable[str] = (),
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The pod's side of the environment: pod env, ``TELEPRESENCE_*``, then ``overrides``."""
    env = {k: v for k, v in pod_env.items() if k not in EXCLUDED_POD_VARIABLES}
    env.update(telepresence_variables(pod=pod, container=container, root=root, mounts=mounts))
    env.update(overrides or {})
    return env


def process_environment(local: Mapping[str, str], pod_side: Mapping[str, str]) -> dict[str, str]:
    """The full environment of the local process: ``local`` below ``pod_side`` (what
    :func:`pod_environment` returns)."""
    return {**local, **pod_side}


def _check_key(key: str) -> None:
    if not _KEY.fullmatch(key):
        raise ValueError(
            f"environment variable name {key!r} cannot be written to a dotenv file "
            "(letters, digits, `_`, `.` and `-` only, not starting with a digit): use JSON"
        )


def to_dotenv(mapping: Mapping[str, str], *, header: str | None = None) -> str:
    """Write ``mapping`` as a Docker Compose ``.env`` file, sorted by key.

    Every value is double-quoted; backslash, double quote, ``$``, newline and carriage return
    are escaped (``\\\\ \\" \\$ \\n \\r``), so Compose reads the value back exactly and does not
    interpolate it. ``header`` becomes ``#`` comment lines at the top. Raises ``ValueError`` for
    a key a dotenv file cannot hold, or a value with a NUL character.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    for key in sorted(mapping):
        _check_key(key)
        value = mapping[key]
        if "\0" in value:
            raise ValueError(f"the value of {key} contains a NUL character")
        escaped = "".join(_ESCAPES.get(char, char) for char in value)
        lines.append(f'{key}="{escaped}"')
    return "".join(line + "\n" for line in lines)


def from_dotenv(text: str) -> dict[str, str]:
    """Read a file written by :func:`to_dotenv`.

    It accepts what :func:`to_dotenv` writes, plus blank lines, ``#`` comments, an ``export``
    prefix, single-quoted (literal) and unquoted values. It does not interpolate ``$VAR``.
    Raises ``ValueError`` with the line number on anything else.
    """
    env: dict[str, str] = {}
    pos, line, end = 0, 1, len(text)
    while pos < end:
        newline = text.find("\n", pos)
        stop = end if newline < 0 else newline
        stripped = text[pos:stop].strip()
        if not stripped or stripped.startswith("#"):
            pos, line = stop + 1, line + 1
            continue

        key_end = text.find("=", pos, stop)
        if key_end < 0:
            raise ValueError(f"line {line}: expected KEY=VALUE")
        key = text[pos:key_end].strip()
        key = key.removeprefix("export ").strip()
        if not _KEY.fullmatch(key):
            raise ValueError(f"line {line}: invalid variable name {key!r}")

        pos = key_end + 1
        quote = text[pos] if pos < end else ""
        if quote in ('"', "'"):
            value, pos, line = _quoted(text, pos + 1, quote, line)
            rest_end = text.find("\n", pos)
            rest_end = end if rest_end < 0 else rest_end
            rest = text[pos:rest_end].strip()
            if rest and not rest.startswith("#"):
                raise ValueError(f"line {line}: unexpected text after the closing quote")
            pos = rest_end
        else:
            value = text[pos:stop]
            if " #" in value:
                value = value[: value.index(" #")]
            value = value.strip()
            pos = stop
        env[key] = value
        pos, line = pos + 1, line + 1
    return env


def _quoted(text: str, pos: int, quote: str, line: int) -> tuple[str, int, int]:
    """Read a quoted value from ``pos`` (just after the quote); return it, the end, the line."""
    out: list[str] = []
    start_line = line
    while pos < len(text):
        char = text[pos]
        if char == quote:
            return "".join(out), pos + 1, line
        if char == "\\" and pos + 1 < len(text):
            following = text[pos + 1]
            if quote == '"' and following in _UNESCAPES:
                out.append(_UNESCAPES[following])
                pos += 2
                continue
            if quote == "'" and following == "'":
                out.append("'")
                pos += 2
                continue
        if char == "\n":
            line += 1
        out.append(char)
        pos += 1
    raise ValueError(f"line {start_line}: unterminated quoted value")


def to_json(mapping: Mapping[str, str]) -> str:
    """Write ``mapping`` as a JSON object, keys sorted, indented by 4 (as Telepresence 1 did)."""
    return json.dumps(dict(mapping), sort_keys=True, indent=4, ensure_ascii=False) + "\n"


def write_export(
    path: str | os.PathLike[str],
    mapping: Mapping[str, str],
    format: ExportFormat = "dotenv",
    *,
    header: str | None = None,
) -> Path:
    """Write ``mapping`` to ``path`` atomically, readable by the owner only (mode 0600).

    The environment holds Secrets, so the file is created 0600 in the target directory, written,
    flushed to disk and renamed over ``path``: a reader sees the old file or the new one, never
    a half-written one, and an existing file's wider mode is not kept. Blocking: call it through
    ``anyio.to_thread.run_sync`` from async code. ``header`` is used for dotenv only.
    """
    target = Path(path)
    text = to_dotenv(mapping, header=header) if format == "dotenv" else to_json(mapping)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o600)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target
