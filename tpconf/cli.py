"""The command line: arguments, output, and the only place errors are rendered.

Commands raise :class:`~tpconf.errors.TpconfError`; :func:`main` renders them (exit code 2 for a
config error, 1 otherwise), unwraps exception groups from task groups, and treats anything else as
a bug. ``--debug`` adds tracebacks. Colour is used only on a terminal (rich decides, and honours
``NO_COLOR``).
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tpconf import __version__
from tpconf.config import ConfigWarning, Project, find_config_file, load_project
from tpconf.config.schema import DOCS_PATH, SCHEMA_PATH, docs_text, schema_text
from tpconf.errors import ConfigError, TpconfError, explain, leaves
from tpconf.methods import REGISTRY
from tpconf.reconcile import control, state
from tpconf.reconcile.describe import describe_deployment
from tpconf.reconcile.localpaths import local_paths, outside_project
from tpconf.reconcile.plan import Plan, desired_facets
from tpconf.reconcile.plan import plan as build_plan
from tpconf.reconcile.reporting import Reporter
from tpconf.supervisor import ConsoleSink, to_dotenv, to_json

if TYPE_CHECKING:
    from tpconf.reconcile.session import Session

# The Kubernetes client and the SSH library take most of a second to import: commands that talk
# to the cluster import them when they run (`validate`, `plan`, `schema` stay instant).

#: Exit codes: 2 is also click's code for a bad command line.
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

log = logging.getLogger(__name__)


@dataclass
class State:
    """Options of the `tpconf` group, shared with the commands and with :func:`main`."""

    debug: bool = False


def _console(stderr: bool = True) -> Console:
    # Created per call: click's test runner swaps sys.stdout/sys.stderr. Off a terminal (logs,
    # pipes) rich would assume 80 columns and fold the status table: give it room instead.
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def print_error(message: str) -> None:
    """Print an error (already rendered, with its position) to stderr."""
    _console().print(Text(message, style="red"))


def print_warning_text(text: str) -> None:
    """Print a warning that is not about a position in the file."""
    _console().print(Text(text, style="yellow"))


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
    project = load_project(path, methods=REGISTRY)
    for warning in project.warnings:
        print_warning(warning)
    return path, project


FILE_OPTION = click.option(
    "-f",
    "--file",
    "file",
    # Checks are left to the loader: its messages name the problem the tpconf way.
    type=click.Path(path_type=Path, readable=False),
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
    # Library chatter stays out of the way unless asked for; tpconf's own warnings always show.
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if debug else "warning: %(message)s",
    )
    if not debug:
        for noisy in ("asyncssh", "kubernetes", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


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
    outputs = {SCHEMA_PATH: schema_text(REGISTRY), DOCS_PATH: docs_text(REGISTRY)}
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


class ConsoleReporter(Reporter):
    """How `tpconf up` talks: plans and errors to stderr, the status table to stdout."""

    def warnings(self, warnings: tuple[ConfigWarning, ...]) -> None:
        for warning in warnings:
            print_warning(warning)

    def plan(self, plan: Plan) -> None:
        for action in plan.actions:
            _console().print(Text(str(action), style="dim"))

    def status(self, snapshot: state.Snapshot) -> None:
        print_status(snapshot)

    def config_error(self, error: ConfigError) -> None:
        print_error(explain(error).render() + "\n(the last good configuration keeps running)")

    def error(self, error: TpconfError) -> None:
        print_error(explain(error).render())

    def message(self, text: str) -> None:
        _console().print(Text(text, style="bold"))


def print_status(snapshot: state.Snapshot) -> None:
    """The status table, then what each deployment's method set up (SOCKS port, routes)."""
    console = _console(stderr=False)
    console.print(status_table(snapshot))
    for row in snapshot.deployments:
        if row.outbound and not row.error:
            console.print(f"{row.name} ({row.method}): {row.outbound}")


def status_table(snapshot: state.Snapshot) -> Table:
    """The compact status: deployment, pod, method, exposes, process."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("DEPLOYMENT", "NAMESPACE", "POD", "METHOD", "EXPOSE", "TUNNEL", "PROCESS"):
        table.add_column(column)
    for row in snapshot.deployments:
        problem = row.problem()
        if problem is not None:
            # The whole message (and its hint) was printed when it happened: one line here.
            shown = problem if len(problem) <= 100 else problem[:99] + "…"
            process = Text(shown, "yellow" if row.retry_at is not None else "red")
        else:
            process = Text(row.process)
        table.add_row(
            row.name,
            row.namespace,
            row.pod or "-",
            row.method,
            ", ".join(row.exposes) or "-",
            "-" if row.error else row.tunnel or "-",
            process,
        )
    return table


def _session(path: Path, *, port_forwards: bool = True) -> Session:
    """The session of the project of ``path``; ``down`` and ``status`` never port-forward, so
    they work without kubectl (under ``sudo``, its PATH may not have it)."""
    from tpconf.reconcile.session import Session

    project_dir = path.resolve().parent
    if port_forwards:
        return Session(project_dir=project_dir)
    return Session(project_dir=project_dir, kubectl="kubectl")


@cli.command()
@FILE_OPTION
@click.option("--no-watch", is_flag=True, help="Do not follow edits of the file.")
def up(file: Path | None, no_watch: bool) -> int:
    """Start every deployment of the file and keep them in line with it until Ctrl-C."""
    from tpconf.reconcile.up import run_up

    path = file if file is not None else find_config_file()
    session = _session(path)
    return anyio.run(
        partial(run_up, path, session, ConsoleSink(), ConsoleReporter(), watch=not no_watch),
        backend="asyncio",
    )


@cli.command()
@FILE_OPTION
def plan(file: Path | None) -> None:
    """Show what `tpconf up` would do, without doing it."""
    _, project = load(file)
    for warning in outside_project(project):
        print_warning(warning)
    actions = build_plan({}, desired_facets(project, REGISTRY))
    console = _console(stderr=False)
    for spec in project.deployments:
        console.print(Text(f"{spec.name}:", style="bold"))
        for line in describe_deployment(spec):
            console.print(f"  {line}")
    console.print(Text("paths on this machine:", style="bold"))
    for local in local_paths(project):
        whose = f"{local.deployment}: " if local.deployment else ""
        console.print(f"  {local.path} ({whose}{local.what})")
    console.print(Text(f"{len(actions.actions)} unit(s) to start:", style="dim"))
    for action in actions.actions:
        console.print(Text(f"  {action}", style="dim"))


@cli.command()
@FILE_OPTION
@click.option("--all", "everything", is_flag=True, help="Every tpconf object in the namespaces.")
def down(file: Path | None, everything: bool) -> int:
    """Restore swapped Deployments and delete what tpconf left in the cluster (even after a crash)."""
    from tpconf.reconcile import cleanup

    path = file if file is not None else find_config_file()
    report = anyio.run(
        partial(
            cleanup.down,
            _session(path, port_forwards=False),
            path,
            everything=everything,
            progress=lambda text: _console().print(Text(text, style="dim")),
        ),
        backend="asyncio",
    )
    for warning in report.warnings:
        print_warning_text(warning.render())
    for line in report.done:
        _console(stderr=False).print(line)
    for failure in report.failures:
        print_error(failure.render())
    return EXIT_FAILURE if report.failures else EXIT_OK


@cli.command()
@FILE_OPTION
def status(file: Path | None) -> int:
    """Show what a running `tpconf up` is doing (or what a crashed one left behind)."""
    path = file if file is not None else find_config_file()
    snapshot = state.read(path.resolve().parent / ".tpconf")
    console = _console(stderr=False)
    if snapshot is not None and snapshot.alive:
        console.print(f"tpconf up is running (pid {snapshot.pid}, session {snapshot.session})")
        print_status(snapshot)
        return EXIT_OK
    if snapshot is None:
        console.print("tpconf up is not running here")
    else:
        console.print(
            Text(
                f"tpconf up (pid {snapshot.pid}) ended without cleaning up; "
                "run `tpconf down` to restore the cluster",
                style="yellow",
            )
        )
        print_status(snapshot)
    left = anyio.run(partial(_cluster_leftovers, path), backend="asyncio")
    if left:
        console.print("left in the cluster by this project (`tpconf down` cleans up):")
        for line in left:
            console.print(f"  {line}")
    return EXIT_FAILURE


async def _cluster_leftovers(path: Path) -> list[str]:
    from tpconf.reconcile import cleanup

    try:
        project = load_project(path, methods=REGISTRY)
    except TpconfError as exc:
        return [f"(could not check the cluster: {explain(exc).render()})"]
    return await cleanup.cluster_leftovers(_session(path, port_forwards=False), project)


@cli.command()
@FILE_OPTION
@click.argument("name")
@click.option(
    "--format", "fmt", type=click.Choice(["dotenv", "json"]), default="dotenv", show_default=True
)
def env(file: Path | None, name: str, fmt: str) -> None:
    """Print the environment deployment NAME's process gets from the pod (needs `tpconf up`)."""
    path = file if file is not None else find_config_file()
    state_dir = path.resolve().parent / ".tpconf"
    state.check_dir(state_dir)  # a linked directory could hold anyone's socket
    reply = anyio.run(
        partial(control.request, state_dir, {"op": "env", "name": name}), backend="asyncio"
    )
    values = reply["env"]
    assert isinstance(values, dict)
    mapping = {str(k): str(v) for k, v in values.items()}
    click.echo(to_json(mapping) if fmt == "json" else to_dotenv(mapping), nl=False)


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
        code = max(int(e.exit_code) for e in leaves(group))  # type: ignore[attr-defined]
    except* click.ClickException as group:
        for exc in leaves(group):
            assert isinstance(exc, click.ClickException)
            exc.show()
            code = max(code, exc.exit_code)
    except* click.Abort:
        print_error("aborted")
        code = max(code, EXIT_FAILURE)
    except* KeyboardInterrupt:
        code = max(code, 130)
    except* Exception as group:  # noqa: BLE001 - tpconf's errors, and bugs (explain says which)
        for exc in leaves(group):
            if state.debug:
                _traceback(exc)
            explained = explain(exc)
            print_error(("error: " if explained.bug else "") + explained.render())
            code = max(code, EXIT_CONFIG if explained.config else EXIT_FAILURE)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
