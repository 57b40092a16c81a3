"""The environment of a deployment's local process, and the files ``env.export`` writes.

Precedence, lowest first (Telepresence 1's order, with the file's overrides on top):

1. the local environment of ``tpconf`` (so ``PATH``, ``HOME``, ``TERM`` … keep working);
2. the pod's environment, except ``HOME``, ``PATH`` and ``HOSTNAME``, which describe the
   container and would break a local program (Telepresence 1 removed the same three), and
   except the variables that change how local programs load or start (:data:`STARTUP_VARIABLES`,
   :data:`STARTUP_PREFIXES`: ``LD_PRELOAD``, ``BASH_ENV``, ``PROMPT_COMMAND``, ``SHELL``,
   ``PYTHONSTARTUP``, ``NODE_OPTIONS`` …): a pod's value there would run code, or load it, in
   every program the process starts on this machine. Naming one in ``env.set`` sets it;
3. ``TELEPRESENCE_POD``, ``TELEPRESENCE_CONTAINER``, ``TELEPRESENCE_MOUNTS`` (the pod's mount
   points joined with ``:``) and ``TELEPRESENCE_ROOT`` (only when the volumes are mounted, as
   Telepresence 1 set it only after mounting);
4. the file's overrides (``env.set``), which win over everything, ``TELEPRESENCE_*`` included.

:func:`pod_environment` is layers 2-4: what ``env.export`` and ``tpconf env NAME`` show.
:func:`process_environment` puts layer 1 below it.

**The dotenv file is safe to source** (``set -a; . FILE`` in bash or sh): whatever a value holds,
sourcing it sets the variable to exactly that value and runs nothing. Values are single-quoted,
which bash, Docker Compose's ``env_file`` and python-dotenv all read literally (dollars,
backticks, ``$(...)``, double quotes and newlines included). A value that cannot be written so
(it holds a single quote, a carriage return or two backslashes in a row, or ends in a backslash)
is double-quoted, with a backslash before each backslash, double quote, dollar and backtick:
bash's own escapes. Keys must be shell names (letters, digits, ``_``, not starting with a
digit): bash runs any other ``KEY=VALUE`` line as a command, so a dotenv export refuses it (JSON
takes every key). bash's own variables keep bash's values when the file is sourced (``_``,
``UID``, ``EUID``, ``PPID``, ``SHELLOPTS``... are set or read-only in bash: a pod's ``UID`` is
reported as read-only and left). Telepresence 1 wrote values unquoted; tpconf's first writer
escaped newlines as backslash-n, which bash reads as two characters, and left backticks to run.

Where the other readers differ (measured with python-dotenv and compose-go in
``tests/supervisor/test_env.py``): python-dotenv replaces ``${NAME}`` in any value unless it
reads with ``interpolate=False``; in a double-quoted value it keeps the backslash before a
dollar or a backtick and reads a carriage return as a newline; Compose keeps the backslash
before a backtick. Single-quoted values (all but the four cases above) read back the same
everywhere, but for python-dotenv's ``${NAME}``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from tpconf.errors import ProcessError

__all__ = [
    "EXCLUDED_POD_VARIABLES",
    "STARTUP_PREFIXES",
    "STARTUP_VARIABLES",
    "DotenvError",
    "ExportFormat",
    "from_dotenv",
    "pod_environment",
    "process_environment",
    "starts_programs",
    "telepresence_variables",
    "to_dotenv",
    "to_json",
    "withheld_variables",
    "write_export",
]

#: Pod variables that describe the container rather than the application.
EXCLUDED_POD_VARIABLES = frozenset({"HOME", "PATH", "HOSTNAME"})

#: Pod variables that change how local programs load or start: the dynamic loader's, what a
#: shell runs at start or at each prompt, and what makes an interpreter load code first. The
#: pod's values are not passed on; ``env.set`` can set them.
STARTUP_VARIABLES = frozenset(
    {
        # the C library and the dynamic loader
        "GLIBC_TUNABLES", "GCONV_PATH", "LOCPATH", "NLSPATH", "MALLOC_CONF",
        # shells: start-up files, prompts that run commands, parsing, the shell itself
        "BASH_ENV", "ENV", "ZDOTDIR", "PROMPT_COMMAND", "PS0", "PS1", "PS2", "PS3", "PS4",
        "SHELLOPTS", "BASHOPTS", "IFS", "CDPATH", "SHELL",
        # interpreters that load code named by a variable
        "PYTHONSTARTUP", "PYTHONHOME", "PYTHONPATH", "PYTHONINSPECT", "PYTHONUSERBASE",
        "PERL5OPT", "PERL5LIB", "PERLLIB", "PERL5DB", "RUBYOPT", "RUBYLIB",
        "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS",
        # programs that run other programs on your behalf
        "LESSOPEN", "LESSCLOSE", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_EXEC_PATH", "GIT_ASKPASS",
        "SSH_ASKPASS", "SUDO_ASKPASS", "EDITOR", "VISUAL", "PAGER", "BROWSER",
    }
)  # fmt: skip

#: Prefixes of such variables: the loader's (``LD_PRELOAD``, ``LD_LIBRARY_PATH``, ``LD_AUDIT``;
#: ``DYLD_*`` on macOS) and functions bash imports from its environment (``BASH_FUNC_name%%``).
STARTUP_PREFIXES = ("LD_", "DYLD_", "BASH_FUNC_")

ExportFormat = Literal["dotenv", "json"]

#: Keys a dotenv file can hold: shell names. bash runs ``a.b=1`` as a command.
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: What bash unescapes in a double-quoted word (and Compose and python-dotenv mostly too).
_DOUBLE_ESCAPES = {"\\": "\\\\", '"': '\\"', "$": "\\$", "`": "\\`"}


class DotenvError(ProcessError, ValueError):
    """Raised when an environment cannot be written as a dotenv file (a key that is no shell
    name, a NUL in a value)."""


def starts_programs(name: str) -> bool:
    """Whether variable ``name`` changes how local programs load or start (see
    :data:`STARTUP_VARIABLES`)."""
    return name in STARTUP_VARIABLES or name.startswith(STARTUP_PREFIXES)


def withheld_variables(
    pod_env: Mapping[str, str], overrides: Mapping[str, str] | None = None
) -> list[str]:
    """The pod's variables that :func:`pod_environment` leaves out because they change how
    programs start, sorted; those ``overrides`` set are not counted (the file sets them)."""
    return sorted(k for k in pod_env if starts_programs(k) and k not in (overrides or {}))


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
    """The pod's side of the environment: pod env (less the container's own variables and
    those that change how programs start), ``TELEPRESENCE_*``, then ``overrides``."""
    env = {
        k: v
        for k, v in pod_env.items()
        if k not in EXCLUDED_POD_VARIABLES and not starts_programs(k)
    }
    env.update(telepresence_variables(pod=pod, container=container, root=root, mounts=mounts))
    env.update(overrides or {})
    return env


def process_environment(local: Mapping[str, str], pod_side: Mapping[str, str]) -> dict[str, str]:
    """The full environment of the local process: ``local`` below ``pod_side`` (what
    :func:`pod_environment` returns)."""
    return {**local, **pod_side}


def _check_key(key: str) -> None:
    if not _KEY.fullmatch(key):
        raise DotenvError(
            f"the environment has a variable named {key!r}, which is not a shell name (letters, "
            "digits and `_`, not starting with a digit): a dotenv file cannot hold it, since "
            "sourcing the file would run it as a command",
            hint="export the environment as JSON instead: `env.export: {file: FILE.json}` in "
            "telepresence.yaml, or `tpconf env NAME --format json`",
        )


def _dotenv_value(value: str) -> str:
    """``value`` as written after ``KEY=``: a word bash reads back as exactly ``value``."""
    if "'" in value or "\r" in value or "\\\\" in value or value.endswith("\\"):
        return '"' + "".join(_DOUBLE_ESCAPES.get(char, char) for char in value) + '"'
    return f"'{value}'"


def to_dotenv(mapping: Mapping[str, str], *, header: str | None = None) -> str:
    """Write ``mapping`` as a dotenv file that is safe to source, sorted by key.

    Sourcing it in bash or sh sets each variable to exactly its value and runs nothing (see
    the module docstring for the quoting, and where Compose and python-dotenv differ).
    ``header`` becomes ``#`` comment lines at the top. Raises :class:`DotenvError` for a key
    that is not a shell name or a value with a NUL character.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    for key in sorted(mapping):
        _check_key(key)
        value = mapping[key]
        if "\0" in value:
            raise DotenvError(
                f"the value of {key} contains a NUL character, which no environment can hold",
                hint="export the environment as JSON instead: `env.export: {file: FILE.json}`",
            )
        if not _is_text(value):
            raise DotenvError(
                f"the value of {key} is not text: it holds a lone surrogate (a JSON escape like "
                "\\ud800 in the pod's spec), which no file or environment can hold",
                hint="export the environment as JSON instead: `env.export: {file: FILE.json}`",
            )
        lines.append(f"{key}={_dotenv_value(value)}")
    return "".join(line + "\n" for line in lines)


def from_dotenv(text: str) -> dict[str, str]:
    """Read a dotenv file as bash would source it (for the forms :func:`to_dotenv` writes).

    Accepts blank lines, ``#`` comments, an ``export`` prefix, single-quoted values (literal,
    across lines), double-quoted values (``\\\\ \\" \\$ \\```` are escapes, any other
    backslash is itself) and unquoted values (to the end of the line or a `` #`` comment). It
    does not expand ``$VAR``. Raises ``ValueError`` with the line number on anything else.
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
        if quote == '"' and char == "\\" and text[pos + 1 : pos + 2] in _DOUBLE_ESCAPES:
            out.append(text[pos + 1])
            pos += 2
            continue
        if char == "\n":
            line += 1
        out.append(char)
        pos += 1
    raise ValueError(f"line {start_line}: unterminated quoted value")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_json(mapping: Mapping[str, str]) -> str:
    """Write ``mapping`` as a JSON object, keys sorted, indented by 4 (as Telepresence 1 did).

    Non-ASCII text is written as it is; a lone surrogate (which UTF-8 cannot hold) makes the
    whole file ASCII with ``\\u`` escapes, which JSON readers turn back into the same string.
    """
    text = json.dumps(dict(mapping), sort_keys=True, indent=4, ensure_ascii=False)
    if not _is_text(text):
        text = json.dumps(dict(mapping), sort_keys=True, indent=4)
    return text + "\n"


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
    a half-written one, and an existing file's wider mode is not kept. A missing directory is
    created (0700: it will hold Secrets). Blocking: call it through ``anyio.to_thread.run_sync``
    from async code. ``header`` is used for dotenv only. Raises :class:`DotenvError` for what a
    dotenv file cannot hold and :class:`~tpconf.errors.ProcessError` when the file cannot be
    written.
    """
    target = Path(path)
    text = to_dotenv(mapping, header=header) if format == "dotenv" else to_json(mapping)
    try:
        missing = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
        for directory in reversed(missing):  # mkdir(parents=True) would ignore the mode
            directory.mkdir(mode=0o700, exist_ok=True)
        return _replace(target, text)
    except OSError as exc:
        raise ProcessError(
            f"cannot write the environment to {target}: {exc.strerror or exc}",
            hint="change `env.export` in telepresence.yaml to a path you can write",
        ) from exc


def _replace(target: Path, text: str) -> Path:
    """Write ``text`` to a 0600 temporary file beside ``target`` and rename it over it."""
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
