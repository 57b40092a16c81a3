"""Loading telepresence.yaml: find it, read it with its overrides, validate it, and explain every
problem.

A project's configuration is made of (:class:`ConfigFiles`), in this order, each merged over the
ones before it as docker compose merges its files (:func:`~tpconf.config.yamlsource.merge`:
mappings key by key, lists replaced):

1. the main file: ``-f FILE``, else the nearest ``telepresence.yaml``;
2. without ``-f``, ``telepresence.override.yaml`` beside it when it exists (a person's own
   changes, kept out of git); with ``-f``, the further ``-f`` files in their order instead;
3. ``--context`` and ``--namespace`` of the command line, as the top-level keys.

``${VAR}`` in each file is replaced from the environment, then from ``.env`` in the project
directory (:mod:`~tpconf.config.dotenv`). :func:`load_project` is the entry point. Every problem
found in one read is reported at once, as :class:`~tpconf.errors.ConfigErrors`, each with the
``file:line:column`` of the file it is in and the dotted key (``deployments.web.expose[1]``).
Pydantic's messages are rewritten into short ones with a hint that names the fix, and misspelled
keys get a "did you mean".
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from tpconf.config.methods import MethodCatalog
from tpconf.config.models import (
    METHODS_CONTEXT,
    NOT_IN_DEFAULTS,
    SUPPORTED_VERSIONS,
    TelepresenceFile,
)
from tpconf.config.project import Project
from tpconf.config.resolve import resolve
from tpconf.config.values import describe
from tpconf.config.yamlsource import (
    MAX_FILE_SIZE,
    DocPath,
    Locator,
    decode,
    format_loc,
    merge,
    parse_yaml,
    read_source,
)
from tpconf.errors import ConfigError, ConfigErrors, Position

#: The file tpconf looks for, in the current directory and then in its parents.
DEFAULT_FILENAME = "telepresence.yaml"

#: A person's own changes, merged over the file found beside it (not with ``-f``).
OVERRIDE_FILENAME = "telepresence.override.yaml"

#: Variables for ``${VAR}``, in the project directory (as docker compose reads its own).
DOTENV_FILENAME = ".env"


def find_config_file(start: Path | None = None) -> Path:
    """The nearest ``telepresence.yaml`` in ``start`` (default: the cwd) or its parents.

    The path is relative to the current directory when it is below it or in a parent, so
    messages name it as a user would (``telepresence.yaml``, ``../telepresence.yaml``).
    """
    cwd = Path.cwd()
    here = (start or cwd).absolute()
    for directory in (here, *here.parents):
        candidate = directory / DEFAULT_FILENAME
        if candidate.is_file():
            return Path(os.path.relpath(candidate, cwd)) if start is None else candidate
    raise ConfigError(
        f"no {DEFAULT_FILENAME} in {here} or any parent directory",
        position=Position(DEFAULT_FILENAME),
        hint="`tpconf init` writes one for Deployments of the cluster, or pass a file with -f",
    )


@dataclass(frozen=True)
class ConfigFiles:
    """Where a project's configuration comes from (see the module docstring)."""

    files: tuple[Path, ...]
    """The main file, then the files merged over it, as the user named them."""
    auto_override: bool = False
    """Also merge :data:`OVERRIDE_FILENAME` beside the main file when it exists."""
    settings: tuple[tuple[str, str, str], ...] = ()
    """``(flag, key, value)`` set from the command line over every file: ``--namespace``."""

    @classmethod
    def find(
        cls,
        files: Sequence[Path] = (),
        *,
        context: str | None = None,
        namespace: str | None = None,
    ) -> ConfigFiles:
        """``-f`` files as given, else the nearest telepresence.yaml and its override file."""
        given = (("--context", "context", context), ("--namespace", "namespace", namespace))
        settings = tuple((flag, key, value) for flag, key, value in given if value is not None)
        if files:
            return cls(tuple(files), settings=settings)
        return cls((find_config_file(),), auto_override=True, settings=settings)

    @property
    def main(self) -> Path:
        """The main file (the project is its directory)."""
        return self.files[0]

    @property
    def project_dir(self) -> Path:
        """The directory of the main file, absolute: ``.tpconf/`` and ``.env`` are there."""
        return self.main.absolute().parent

    @property
    def override(self) -> Path | None:
        """The override file looked for beside the main file (``None`` with ``-f``)."""
        return self.main.parent / OVERRIDE_FILENAME if self.auto_override else None

    @property
    def dotenv(self) -> Path:
        """The project's ``.env``."""
        return self.main.parent / DOTENV_FILENAME

    def present(self) -> tuple[Path, ...]:
        """The files read now, in merge order: the override file only when it exists."""
        override = self.override
        extra = (override,) if override is not None and override.is_file() else ()
        return (*self.files, *extra)

    def watched(self) -> tuple[Path, ...]:
        """Every file whose creation, edit or removal changes the configuration."""
        override = self.override
        return (*self.files, *((override,) if override is not None else ()), self.dotenv)


@dataclass(frozen=True)
class Document:
    """The merged, interpolated data of a project's files, with the position of every value."""

    data: Any
    locator: Locator
    display: str
    """The main file as messages name it."""
    base_dir: Path


def _environment(files: ConfigFiles, env: Mapping[str, str] | None) -> Mapping[str, str]:
    """``env`` (default: ``os.environ``) over the project's ``.env``, if it has one."""
    outer = os.environ if env is None else env
    path = files.dotenv
    try:
        if not path.is_file():
            return outer
    except OSError:
        return outer
    from tpconf.config.dotenv import parse_dotenv  # most projects have none: `validate` stays quick

    text = decode(read_source(path, os.fspath(path)), os.fspath(path))
    return {**parse_dotenv(text, os.fspath(path), outer), **outer}


def load_document(files: ConfigFiles, *, env: Mapping[str, str] | None = None) -> Document:
    """Read and merge the files of ``files`` (and ``.env``), not yet validated.

    Raises :class:`~tpconf.errors.ConfigError` (or :class:`~tpconf.errors.ConfigErrors`, every
    problem of every file) with the position in the file that has it.
    """
    variables = _environment(files, env)
    data: Any = None
    locator = Locator(os.fspath(files.main))
    problems: list[ConfigError] = []
    for index, path in enumerate(files.present()):
        display = os.fspath(path)
        try:
            text = decode(read_source(path, display), display)
            layer, at = parse_yaml(text, display, variables, allow_empty=index > 0)
        except ConfigErrors as exc:
            problems.extend(exc.errors)
            continue
        except ConfigError as exc:
            problems.append(exc)
            continue
        data, locator = (layer, at) if index == 0 else merge(data, locator, layer, at)
    if problems:
        raise ConfigErrors(problems) if len(problems) > 1 else problems[0]
    for flag, key, value in files.settings:
        at = Locator(flag, {(key,): Position(flag)}, {(key,): Position(flag)})
        data, locator = merge(data, locator, {key: value}, at)
    return Document(data, locator, os.fspath(files.main), files.project_dir)


def load_project(
    source: str | os.PathLike[str] | ConfigFiles,
    *,
    methods: MethodCatalog,
    env: Mapping[str, str] | None = None,
) -> Project:
    """Read, merge, validate and resolve a project's configuration.

    ``source`` is a :class:`ConfigFiles`, or one file (no override file). ``methods`` is the
    method registry (``tpconf.methods.REGISTRY``): the valid values of `method` and their rules.
    Messages name each file as it was given. ``env`` is the environment for ``${VAR}`` (default:
    ``os.environ``); the project's ``.env`` fills in what it lacks. Raises
    :class:`~tpconf.errors.ConfigError` or :class:`~tpconf.errors.ConfigErrors`; warnings are in
    :attr:`Project.warnings`.
    """
    files = source if isinstance(source, ConfigFiles) else ConfigFiles((Path(os.fspath(source)),))
    document = load_document(files, env=env)
    return project_of(document, methods=methods)


def project_of(document: Document, *, methods: MethodCatalog) -> Project:
    """Validate and resolve a loaded :class:`Document`."""
    model = validate(document.data, document.locator, methods)
    base = document.base_dir
    return resolve(
        model,
        document.locator,
        source_path=base / Path(document.display).name,
        base_dir=base,
        methods=methods,
        display=document.display,
    )


def parse_project(
    text: str | bytes,
    *,
    methods: MethodCatalog,
    filename: str = DEFAULT_FILENAME,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Project:
    """Validate and resolve telepresence.yaml content; ``filename`` is how messages name it.

    Relative paths in the file are relative to ``base_dir`` (default: the current directory).
    """
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_SIZE:
            raise ConfigError(
                f"file is larger than {MAX_FILE_SIZE // 1024} KiB", position=Position(filename)
            )
        text = decode(text, filename)
    data, locator = parse_yaml(text, filename, env)
    base = (base_dir or Path.cwd()).absolute()
    document = Document(data, locator, filename, base)
    return project_of(document, methods=methods)


def validate(data: Any, locator: Locator, methods: MethodCatalog) -> TelepresenceFile:
    """Validate parsed data against the models; errors carry the positions of ``locator``."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level must be a mapping with keys such as `version` and `deployments`, "
            f"not {_kind(data)}",
            position=locator.value(()),
            hint="start with `version: 1` and a `deployments:` mapping (`tpconf init` writes one)",
        )
    version = data.get("version")
    if isinstance(version, str) and version.strip().isdigit():
        version = data["version"] = int(version)
    if "version" in data and (
        isinstance(version, bool) or not isinstance(version, int) or version not in (1,)
    ):
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise ConfigError(
            f"unsupported version {describe(version)}: this tpconf reads version {supported}",
            position=locator.value(("version",)),
            loc="version",
            hint="set `version: 1`, or install the tpconf that wrote this file",
        )
    try:
        return TelepresenceFile.model_validate(data, context={METHODS_CONTEXT: methods})
    except ValidationError as exc:
        errors = _dedupe(translate(error, data, locator) for error in exc.errors())
        raise ConfigErrors(errors) if len(errors) > 1 else errors[0] from None


def _dedupe(errors: typing.Iterable[ConfigError]) -> list[ConfigError]:
    seen: dict[tuple[str, str, str], ConfigError] = {}
    for error in errors:
        seen.setdefault((str(error.position), error.loc, error.message), error)
    return list(seen.values())


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return describe(value)


# ---- pydantic errors -> ConfigError -------------------------------------------------------------


def translate(error: ErrorDetails, data: Any, locator: Locator) -> ConfigError:
    """One pydantic error as a :class:`ConfigError` at the position of the YAML node."""
    kind = error["type"]
    path: list[str | int] = []
    node = data
    missing: str | None = None
    key_error = False
    for index, part in enumerate(error["loc"]):
        if part == "[key]":
            key_error = True
            break
        child = _child(node, part)
        if child is _ABSENT:
            # Not in the file: a missing key, or pydantic's own loc (union members, shorthands).
            if kind == "missing" and index == len(error["loc"]) - 1 and isinstance(part, str):
                missing = part
            continue
        node = child
        path.append(part)
    where: DocPath = tuple(path)
    loc = format_loc(where)
    ctx: dict[str, Any] = dict(error.get("ctx") or {})

    if kind == "tpconf":
        position = locator.key(where) if key_error or _is_collection(node) else locator.value(where)
        return ConfigError(ctx["message"], position=position, loc=loc, hint=ctx.get("hint"))
    if kind == "missing" and missing is not None:
        return ConfigError(
            f"missing required key `{missing}`",
            position=locator.key(where),
            loc=loc,
            hint=_MISSING_HINTS.get(missing),
        )
    if kind == "extra_forbidden":
        return _unknown_key(where, locator)
    position = locator.key(where) if _is_collection(node) else locator.value(where)
    message, hint = _rewrite(kind, error, ctx, node)
    return ConfigError(message, position=position, loc=loc, hint=hint)


_ABSENT = object()


def _child(node: Any, part: str | int) -> Any:
    """``node[part]`` if the file has it, else :data:`_ABSENT`."""
    if isinstance(node, dict) and isinstance(part, str) and part in node:
        return node[part]
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return _ABSENT


_MISSING_HINTS = {
    "version": "add `version: 1` at the top of the file",
    "deployments": "add a `deployments:` mapping (`tpconf init` writes one)",
    "pod": "for example `pod: /var/run/secrets/kubernetes.io`",
    "local": "for example `local: ./.k8s`",
    "file": "for example `file: .env.web`",
}


def _is_collection(value: Any) -> bool:
    return isinstance(value, dict | list)


def _rewrite(
    kind: str, error: ErrorDetails, ctx: dict[str, Any], value: Any
) -> tuple[str, str | None]:
    got = describe(value)
    if kind in {"int_type", "int_parsing", "int_from_float"}:
        return f"expected an integer, got {got}", None
    if kind in {"bool_type", "bool_parsing"}:
        return f"expected `true` or `false`, got {got}", None
    if kind in {"string_type", "string_unicode"}:
        hint = (
            "quote it" if isinstance(value, int | float) and not isinstance(value, bool) else None
        )
        return f"expected a string, got {got}", hint
    if kind in {"dict_type", "model_type", "model_attributes_type", "mapping_type"}:
        return f"expected a mapping, got {got}", None
    if kind in {"list_type", "tuple_type", "iterable_type", "sequence_str"}:
        return f"expected a list, got {got}", None
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        shown = " or ".join(f"`{a}`" for a in allowed)
        hint = None
        if isinstance(value, str):
            close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else None
        return f"{got} is not allowed: expected {shown}", hint
    if kind in {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}:
        return f"{got} is out of range: {error['msg'].lower().removeprefix('input ')}", None
    message = error["msg"]
    return f"{message[:1].lower()}{message[1:]}", None


def _unknown_key(where: DocPath, locator: Locator) -> ConfigError:
    key = str(where[-1])
    parent = where[:-1]
    allowed = _allowed_keys(parent)
    loc = format_loc(where)
    if parent == ("defaults",) and key in NOT_IN_DEFAULTS:
        return ConfigError(
            f"`{key}` cannot be set in `defaults`",
            position=locator.key(where),
            loc=loc,
            hint=f"set `{key}` {NOT_IN_DEFAULTS[key]}",
        )
    normalised = key.replace("_", "-").lower()
    close = [normalised] if normalised in allowed else []
    close = close or difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    if close:
        hint = f"did you mean `{close[0]}`?"
    elif allowed:
        hint = "valid keys here: " + ", ".join(f"`{k}`" for k in allowed)
    else:
        hint = None
    return ConfigError(f"unknown key `{key}`", position=locator.key(where), loc=loc, hint=hint)


def _allowed_keys(path: DocPath) -> list[str]:
    """The keys the model at ``path`` accepts, in declaration order."""
    target: Any = TelepresenceFile
    for part in path:
        target = _unwrap(target)
        if isinstance(target, type) and issubclass(target, BaseModel):
            field = next(
                (f for name, f in target.model_fields.items() if (f.alias or name) == part), None
            )
            if field is None:
                return []
            target = field.annotation
            continue
        origin, args = typing.get_origin(target), typing.get_args(target)
        if origin is dict and args:
            target = args[1]
        elif origin in {tuple, list} and args:
            target = args[0]
        else:
            return []
    target = _unwrap(target)
    if isinstance(target, type) and issubclass(target, BaseModel):
        return [f.alias or name for name, f in target.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` -> X; ``X | None`` -> X (the model, if the union has one)."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [_unwrap(a) for a in typing.get_args(annotation) if a is not type(None)]
        for member in members:
            if isinstance(member, type) and issubclass(member, BaseModel):
                return member
        return members[0] if members else annotation
    return annotation
