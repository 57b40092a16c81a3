"""The command line: arguments, output, and the only place errors are rendered.

Commands raise :class:`~tpconf.errors.TpconfError`; :func:`main` renders them (exit code 2 for a
config error, 1 otherwise), unwraps exception groups from task groups, and treats anything else as
a bug. ``--debug`` adds tracebacks. Colour is used only on a terminal (rich decides, and honours
``NO_COLOR``).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.text import Text

from tpconf import __version__
from tpconf.config import ConfigWarning, Project, find_config_file, load_project
from tpconf.config.schema import DOCS_PATH, SCHEMA_PATH, docs_text, schema_text
from tpconf.errors import ConfigError, NotImplementedYet, TpconfError

#: Exit codes: 2 is also click's code for a bad command line.
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

BUG_MESSAGE = "this is a bug in tpconf, please report it"


@dataclass
class State:
    """Options of the `tpconf` group, shared with the commands and with :func:`main`."""

    debug: bool = False


def _console(stderr: bool = True) -> Console:
    # Created per call: click's test runner swaps sys.stdout/sys.stderr.
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    """Print an error (already rendered, with its position) to stderr."""
    _console().print(Text(message, style="red"))


def print_warning(warning: ConfigWarning) -> None:
    """Print a config warning as `file:line:col: warning: ...` to stderr."""
    _console().print(Text(warning.render(), style="yellow"))


def project_root() -> Path:
    """The directory that holds the `tpconf` package: schemas/ and docs/ are under it."""
    import tpconf

    return Path(tpconf.__file__).resolve().parent.parent


def load(file: Path | None) -> tuple[Path, Project]:
    """Load `-f FILE`, or the nearest telepresence.yaml; print its warnings."""
    path = file if file is not None else find_config_file()
    project = load_project(path)
    for warning in project.warnings:
        print_warning(warning)
    return path, project


FILE_OPTION = click.option(
    "-f",
    "--file",
    "file",
    type=click.Path(path_type=Path),
    default=None,
    help="The config file. Defaults to telepresence.yaml in this directory or the nearest parent.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="tpconf", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.pass_obj
def cli(state: State, debug: bool) -> None:
    """Proxy Kubernetes deployments to this machine, as declared in telepresence.yaml."""
    state.debug = debug


@cli.command()
@FILE_OPTION
def validate(file: Path | None) -> None:
    """Check telepresence.yaml and report every problem with its position."""
    path, project = load(file)
    shown = click.format_filename(path)
    count = len(project.deployments)
    names = ", ".join(project.names)
    plural = "deployment" if count == 1 else "deployments"
    detail = f" ({names})" if names else ""
    click.echo(f"{shown} is valid: {count} {plural}{detail}")


@cli.command()
@click.option("--check", is_flag=True, help="Exit 1 if the committed files are out of date.")
def schema(check: bool) -> None:
    """Write schemas/telepresence.schema.json and docs/configuration.md."""
    root = project_root()
    outputs = {SCHEMA_PATH: schema_text(), DOCS_PATH: docs_text()}
    if check:
        stale = [
            path
            for path, text in outputs.items()
            if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != text
        ]
        if stale:
            raise TpconfError(
                f"schema is out of date: run `make schema` and commit ({', '.join(stale)})"
            )
        click.echo("schema and docs are up to date")
        return
    for path, text in outputs.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        click.echo(f"wrote {path}")


def _not_implemented(command: str) -> None:
    raise NotImplementedYet(f"`tpconf {command}` is not implemented yet")


@cli.command()
@FILE_OPTION
def up(file: Path | None) -> None:
    """Start every deployment and follow changes to the file."""
    _not_implemented("up")


@cli.command()
@FILE_OPTION
def down(file: Path | None) -> None:
    """Stop everything and restore swapped Deployments."""
    _not_implemented("down")


@cli.command()
@FILE_OPTION
def status(file: Path | None) -> None:
    """Show what runs, for each deployment."""
    _not_implemented("status")


@cli.command()
@FILE_OPTION
def plan(file: Path | None) -> None:
    """Show what `tpconf up` would start, stop or restart."""
    _not_implemented("plan")


@cli.command()
@FILE_OPTION
@click.argument("name")
def env(file: Path | None, name: str) -> None:
    """Print the environment of deployment NAME."""
    _not_implemented("env")


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    """The exceptions of a (nested) group, flattened."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _traceback(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    _console().print(Text(text.rstrip(), style="dim"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code; the `tpconf` console script."""
    state = State()
    code = EXIT_OK
    try:
        result = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="tpconf",
            standalone_mode=False,
            obj=state,
        )
        if isinstance(result, int):
            code = result
    except* click.exceptions.Exit as group:
        code = max(int(e.exit_code) for e in _leaves(group))  # type: ignore[attr-defined]
    except* click.ClickException as group:
        for exc in _leaves(group):
            assert isinstance(exc, click.ClickException)
            exc.show()
            code = max(code, exc.exit_code)
    except* click.Abort:
        print_error("aborted")
        code = max(code, EXIT_FAILURE)
    except* KeyboardInterrupt:
        code = max(code, 130)
    except* TpconfError as group:
        for exc in _leaves(group):
            if state.debug:
                _traceback(exc)
            print_error(exc.render() if isinstance(exc, TpconfError) else str(exc))
            config = isinstance(exc, ConfigError)
            code = max(code, EXIT_CONFIG if config else EXIT_FAILURE)
    except* Exception as group:  # noqa: BLE001 - the last resort: a bug, reported as one
        for exc in _leaves(group):
            if state.debug:
                _traceback(exc)
            print_error(f"error: {type(exc).__name__}: {exc}\n{BUG_MESSAGE}")
        code = max(code, EXIT_FAILURE)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
