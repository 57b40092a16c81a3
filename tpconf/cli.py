"""The command line: arguments, output, and the only place errors are rendered.

Commands raise :class:`~tpconf.errors.TpconfError`; :func:`main` renders them (exit code 2 for a
config error, 1 otherwise), unwraps exception groups from task groups, and treats anything else as
a bug. ``--debug`` adds tracebacks. Colour is used only on a terminal (rich decides, and honours
``NO_COLOR``). Work is done in the reconcile layer; this module parses and renders.

Deployment names are completed by the shell (click's completion: ``_TPCONF_COMPLETE=bash_source
tpconf``, see the README), read from the file as ``tpconf validate`` reads it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import click

from tpconf import __version__
from tpconf.config import (
    ConfigFiles,
    ConfigWarning,
    Project,
    load_document,
    load_project,
    project_of,
)
from tpconf.config.schema import DOCS_PATH, SCHEMA_PATH, docs_text, schema_text
from tpconf.errors import ConfigError, TpconfError, explain, leaves
from tpconf.methods import REGISTRY
from tpconf.reconcile import control, state
from tpconf.reconcile.describe import describe_deployment
from tpconf.reconcile.localpaths import local_paths, outside_project
from tpconf.reconcile.plan import Plan, desired_facets
from tpconf.reconcile.plan import plan as build_plan
from tpconf.reconcile.platform import limitations
from tpconf.reconcile.reporting import Reporter
from tpconf.supervisor import ConsoleSink, to_dotenv, to_json
from tpconf.supervisor.output import LOGS_DIR, LogRecord, OutputSink, Stream

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    from tpconf.reconcile.session import ClusterTarget, Session
    from tpconf.supervisor.process import ProcessExit

# The Kubernetes client and the SSH library take most of a second to import: commands that talk
# to the cluster import them when they run. rich too (a twentieth of `validate`): it is imported
# by the first thing that prints through it.

#: Exit codes: 2 is also click's code for a bad command line; 127 is a shell's "not found".
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_NOT_FOUND = 0, 1, 2, 127

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
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def _text(text: str, style: str = "") -> Text:
    from rich.text import Text

    return Text(text, style=style)


def print_error(message: str) -> None:
    """Print an error (already rendered, with its position) to stderr."""
    _console().print(_text(message, style="red"))


def print_warning_text(text: str) -> None:
    """Print a warning that is not about a position in the file."""
    _console().print(_text(text, style="yellow"))


def print_warning(warning: ConfigWarning) -> None:
    """Print a config warning as `file:line:col: warning: ...` to stderr."""
    _console().print(_text(warning.render(), style="yellow"))


def project_root() -> Path:
    """The directory that holds the `tpconf` package: schemas/ and docs/ are under it."""
    import tpconf

    return Path(tpconf.__file__).resolve().parent.parent


def warn_platform() -> None:
    """On a system other than Linux, say at once what will not work and why."""
    lines = limitations()
    if lines:
        print_warning_text("\n".join(lines))


# ---- the options every command that reads the file shares ---------------------------------------


@dataclass(frozen=True)
class Files:
    """``-f``, ``--context``, ``--namespace`` and ``--profile``, as given."""

    file: tuple[Path, ...] = ()
    context: str | None = None
    namespace: str | None = None
    profiles: tuple[str, ...] = ()

    def config(self) -> ConfigFiles:
        return ConfigFiles.find(self.file, context=self.context, namespace=self.namespace)

    def load(
        self, names: Sequence[str] = (), *, quiet: bool = False
    ) -> tuple[ConfigFiles, Project]:
        """The project, selected by ``names`` and the profiles; its warnings printed."""
        files = self.config()
        project = load_project(files, methods=REGISTRY).selected(names, self.profiles)
        if not quiet:
            for warning in project.warnings:
                print_warning(warning)
        return files, project


def _profiles(values: tuple[str, ...]) -> tuple[str, ...]:
    """``--profile`` values, else ``$TPCONF_PROFILES`` (comma-separated, as compose's)."""
    given = values or tuple(os.environ.get("TPCONF_PROFILES", "").split(","))
    return tuple(p.strip() for p in given if p.strip())


def _complete_names(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[Any]:
    """The deployments of the file, for the shell's completion (silent on any problem)."""
    from click.shell_completion import CompletionItem

    try:
        files = ConfigFiles.find(tuple(ctx.params.get("file") or ()))
        names = load_project(files, methods=REGISTRY).names
    except Exception:  # noqa: BLE001 - a completion must never print an error into the prompt
        return []
    return [CompletionItem(name) for name in names if name.startswith(incomplete)]


def file_options(*, profiles: bool = False, short_file: bool = True) -> Callable[[Any], Any]:
    """``-f FILE`` (repeatable), ``--context``, ``-n/--namespace`` and, where a command
    selects deployments, ``--profile``; the command gets them as ``files: Files``."""

    def decorate(function: Any) -> Any:
        # `wraps` carries the parameters other decorators attached (`__click_params__`).
        @functools.wraps(function)
        def wrapper(**kwargs: Any) -> Any:
            files = Files(
                file=tuple(kwargs.pop("file")),
                context=kwargs.pop("context"),
                namespace=kwargs.pop("namespace"),
                profiles=_profiles(tuple(kwargs.pop("profile", ()) or ())),
            )
            return function(files=files, **kwargs)

        decorated: Any = wrapper
        if profiles:
            decorated = click.option(
                "--profile",
                "profile",
                multiple=True,
                metavar="NAME",
                help="Also start the deployments with this profile (repeatable; default: "
                "$TPCONF_PROFILES, comma-separated).",
            )(decorated)
        decorated = click.option(
            "-n",
            "--namespace",
            "namespace",
            default=None,
            metavar="NAMESPACE",
            help="The top-level `namespace` (deployments that set their own keep it).",
        )(decorated)
        decorated = click.option(
            "--context",
            "context",
            default=None,
            metavar="CONTEXT",
            help="The top-level `context` of kubeconfig (deployments that set their own keep it).",
        )(decorated)
        flags = ("-f", "--file") if short_file else ("--file",)
        decorated = click.option(
            *flags,
            "file",
            multiple=True,
            # Checks are left to the loader: its messages name the problem the tpconf way.
            type=click.Path(path_type=Path, readable=False),
            help="The config file (repeat it to merge more over it). Defaults to "
            "telepresence.yaml in this directory or the nearest parent, with "
            "telepresence.override.yaml beside it.",
        )(decorated)
        return decorated

    return decorate


def names_argument(**kwargs: Any) -> Callable[[Any], Any]:
    return click.argument(
        "names", nargs=-1, metavar="[NAME]...", shell_complete=_complete_names, **kwargs
    )


def name_argument() -> Callable[[Any], Any]:
    return click.argument("name", metavar="NAME", shell_complete=_complete_names)


# ---- the commands ------------------------------------------------------------------------------


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
@file_options()
def validate(files: Files) -> None:
    """Check telepresence.yaml (and its overrides) and report every problem with its position."""
    config, project = files.load()
    shown = ", ".join(click.format_filename(p) for p in config.present())
    count = len(project.deployments)
    names = ", ".join(project.names)
    plural = "deployment" if count == 1 else "deployments"
    detail = f" ({names})" if names else ""
    verb = "is" if len(config.present()) == 1 else "are"
    click.echo(f"{shown} {verb} valid: {count} {plural}{detail}")


@cli.command("config")
@file_options(profiles=True)
@names_argument()
@click.option("--services", is_flag=True, help="Print the names of the deployments only.")
def config_command(files: Files, names: tuple[str, ...], services: bool) -> None:
    """Print the file as tpconf reads it: overrides merged, ${VAR} replaced, validated."""
    config = files.config()
    document = load_document(config)
    project = project_of(document, methods=REGISTRY).selected(names, files.profiles)
    for warning in project.warnings:
        print_warning(warning)
    if services:
        for name in project.names:
            click.echo(name)
        return
    from tpconf.config.yamlsource import dump_yaml

    data = dict(document.data)
    data["deployments"] = {
        name: value
        for name, value in (document.data.get("deployments") or {}).items()
        if name in project.names
    }
    click.echo(dump_yaml(data), nl=False)


@cli.command()
@click.option("--check", is_flag=True, help="Exit 1 if the committed files are out of date.")
@click.option("--print", "show", is_flag=True, help="Print the JSON schema of telepresence.yaml.")
def schema(check: bool, show: bool) -> None:
    """Print the JSON schema (--print), or write schemas/ and docs/configuration.md of a
    source checkout of tpconf."""
    if show:
        click.echo(schema_text(REGISTRY), nl=False)
        return
    root = project_root()
    if not (root / "pyproject.toml").is_file() or not (root / "schemas").is_dir():
        raise TpconfError(
            "writing the schema and docs is for a source checkout of tpconf",
            hint="`tpconf schema --print` prints the schema (for example into "
            "telepresence.schema.json for your editor)",
        )
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


class LiveStart:
    """While deployments start on a terminal: one live line each, with what it does and for
    how long (rich). Everything printed meanwhile appears above the lines."""

    def __init__(self, console: Console | None = None, clock: Callable[[], float] = time.monotonic):
        self._console = console
        self._clock = clock
        self._rows: dict[str, list[Any]] = {}
        self.live: Live | None = None

    def begin(self, names: Sequence[str]) -> None:
        from rich.console import Console
        from rich.live import Live

        now = self._clock()
        self._rows = {name: ["starting", now, None, ""] for name in names}
        if not self._rows:
            return
        console = self._console or Console(highlight=False)
        self.live = Live(
            console=console, refresh_per_second=4, get_renderable=self.render, transient=False
        )
        self.live.start()

    def note(self, name: str, text: str) -> bool:
        """Show ``text`` on ``name``'s line; ``True`` when that is all it needs (a progress
        line), ``False`` when it must also be printed (an error, or after the start)."""
        row = self._rows.get(name)
        if self.live is None or row is None:
            return False
        first = text.splitlines()[0] if text else ""
        failed = "failed" in first
        row[0] = first
        if first == "ready" or failed:
            row[2] = self._clock()
            row[3] = "✗" if failed else "✓"
        return not failed

    def end(self) -> None:
        if self.live is not None:
            self.live.refresh()
            self.live.stop()
            self.live = None

    def render(self) -> RenderableType:
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        for _ in range(3):
            table.add_column(no_wrap=True)
        table.add_column(no_wrap=True, overflow="ellipsis")  # one line each, whatever the width
        now = self._clock()
        for name, (text, began, finished, mark) in self._rows.items():
            elapsed = (finished if finished is not None else now) - began
            style = "red" if mark == "✗" else "green" if mark else "yellow"
            table.add_row(
                _text(mark or "…", style=style),
                _text(name, style="bold"),
                _text(f"{elapsed:5.1f}s", style="dim"),
                _text(text),
            )
        return table


class LiveSink:
    """The console sink, with the notices of starting deployments on their live lines."""

    def __init__(self, inner: OutputSink, live: LiveStart) -> None:
        self.inner = inner
        self.live = live

    def write(self, name: str, line: str, *, stream: Stream = "stdout") -> None:
        self.inner.write(name, line, stream=stream)

    def notice(self, name: str, text: str) -> None:
        if not self.live.note(name, text):
            self.inner.notice(name, text)

    def exited(self, name: str, result: ProcessExit) -> None:
        self.inner.exited(name, result)


class ConsoleReporter(Reporter):
    """How `tpconf up` talks: plans and errors to stderr, the status table to stdout."""

    def __init__(self, live: LiveStart | None = None) -> None:
        self.live = live

    def warnings(self, warnings: tuple[ConfigWarning, ...]) -> None:
        for warning in warnings:
            print_warning(warning)

    def plan(self, plan: Plan) -> None:
        if self.live is not None and self.live.live is not None:
            return  # the live lines show the start
        for action in plan.actions:
            _console().print(_text(str(action), style="dim"))

    def status(self, snapshot: state.Snapshot) -> None:
        print_status(snapshot)

    def config_error(self, error: ConfigError) -> None:
        print_error(explain(error).render() + "\n(the last good configuration keeps running)")

    def error(self, error: TpconfError) -> None:
        print_error(explain(error).render())

    def message(self, text: str) -> None:
        _console().print(_text(text, style="bold"))

    def clusters(self, targets: Sequence[ClusterTarget]) -> None:
        # With click, not rich: this line comes before the first API request, and rich's import
        # would delay it.
        color = False if os.environ.get("NO_COLOR") else None
        for target in targets:
            click.secho(f"using {target}", bold=True, err=True, color=color)

    def starting(self, names: Sequence[str]) -> None:
        if self.live is not None:
            self.live.begin(names)

    def started(self) -> None:
        if self.live is not None:
            self.live.end()


def print_status(snapshot: state.Snapshot) -> None:
    """The status table, then what each deployment's method set up (SOCKS port, routes)."""
    console = _console(stderr=False)
    console.print(status_table(snapshot))
    for row in snapshot.deployments:
        if row.outbound and not row.error:
            console.print(f"{row.name} ({row.method}): {row.outbound}")


def status_table(snapshot: state.Snapshot) -> Table:
    """The compact status: deployment, pod, method, exposes, process."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("DEPLOYMENT", "NAMESPACE", "POD", "METHOD", "EXPOSE", "TUNNEL", "PROCESS"):
        table.add_column(column)
    for row in snapshot.deployments:
        problem = row.problem()
        if problem is not None:
            # The whole message (and its hint) was printed when it happened: one line here.
            shown = problem if len(problem) <= 100 else problem[:99] + "…"
            process = _text(shown, "yellow" if row.retry_at is not None else "red")
        else:
            process = _text(row.process)
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


def _session(files: ConfigFiles, *, port_forwards: bool = True) -> Session:
    """The session of the project of ``files``; ``down`` and ``status`` never port-forward, so
    they work without kubectl (under ``sudo``, its PATH may not have it)."""
    from tpconf.reconcile.session import Session

    if port_forwards:
        return Session(project_dir=files.project_dir)
    return Session(project_dir=files.project_dir, kubectl="kubectl")


def _state_dir(files: Files) -> Path:
    state_dir = files.config().project_dir / ".tpconf"
    state.check_dir(state_dir)  # a linked directory could hold anyone's socket
    return state_dir


@cli.command()
@file_options(profiles=True)
@names_argument()
@click.option("--no-watch", is_flag=True, help="Do not follow edits of the files.")
@click.option(
    "--abort-on-exit",
    is_flag=True,
    help="Stop everything when a command exits (or a deployment cannot start); exit with "
    "its exit code.",
)
@click.option(
    "--exit-code-from",
    metavar="NAME",
    default=None,
    shell_complete=_complete_names,
    help="As --abort-on-exit, and exit with the exit code of deployment NAME's command.",
)
def up(
    files: Files,
    names: tuple[str, ...],
    no_watch: bool,
    abort_on_exit: bool,
    exit_code_from: str | None,
) -> int:
    """Start the deployments of the file (or NAME...) and keep them in line with it until
    Ctrl-C. With a `tpconf up` running here already, NAME... are started by that one."""
    from tpconf.reconcile.up import UpOptions, run_up

    warn_platform()
    config = files.config()
    session = _session(config)
    if names:
        reply = anyio.run(
            partial(control.select, session.state_dir, add=list(names)), backend="asyncio"
        )
        if reply is not None:
            return _print_selected(reply)
    options = UpOptions(
        names=names,
        profiles=files.profiles,
        watch=not no_watch,
        abort_on_exit=abort_on_exit,
        exit_code_from=exit_code_from,
    )
    live = LiveStart() if sys.stdout.isatty() and sys.stderr.isatty() else None
    sink: OutputSink = ConsoleSink()
    if live is not None:
        sink = LiveSink(sink, live)
    run = partial(run_up, config, session, sink, ConsoleReporter(live), options)
    return anyio.run(run, backend="asyncio")


def _print_selected(reply: dict[str, object]) -> int:
    started = reply.get("started") or []
    failed = reply.get("failed") or {}
    assert isinstance(started, list)
    assert isinstance(failed, dict)
    if started:
        _console(stderr=False).print(
            f"started {', '.join(map(str, started))} in the running tpconf up (its output "
            "is there; `tpconf logs` shows it here)"
        )
    for name, why in failed.items():
        print_error(f"{name} failed: {why}")
    return EXIT_FAILURE if failed else EXIT_OK


@cli.command()
@file_options(profiles=True)
@names_argument()
def plan(files: Files, names: tuple[str, ...]) -> None:
    """Show what `tpconf up` would do, without doing it."""
    _, project = files.load(names)
    for warning in outside_project(project):
        print_warning(warning)
    actions = build_plan({}, desired_facets(project, REGISTRY))
    console = _console(stderr=False)
    for spec in project.deployments:
        console.print(_text(f"{spec.name}:", style="bold"))
        for line in describe_deployment(spec):
            console.print(f"  {line}")
    console.print(_text("paths on this machine:", style="bold"))
    for local in local_paths(project):
        whose = f"{local.deployment}: " if local.deployment else ""
        console.print(f"  {local.path} ({whose}{local.what})")
    console.print(_text(f"{len(actions.actions)} unit(s) to start:", style="dim"))
    for action in actions.actions:
        console.print(_text(f"  {action}", style="dim"))


@cli.command()
@file_options()
@names_argument()
@click.option("--all", "everything", is_flag=True, help="Every tpconf object in the namespaces.")
def down(files: Files, names: tuple[str, ...], everything: bool) -> int:
    """Restore swapped Deployments and delete what tpconf left in the cluster (even after a
    crash). With NAME..., only those deployments (a running `tpconf up` stops them)."""
    from tpconf.reconcile import cleanup

    config = files.config()
    report = anyio.run(
        partial(
            cleanup.down,
            _session(config, port_forwards=False),
            config,
            everything=everything,
            names=names,
            progress=lambda text: _console().print(_text(text, style="dim")),
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
@file_options()
@names_argument()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(files: Files, names: tuple[str, ...], as_json: bool) -> int:
    """Show what a running `tpconf up` is doing (or what a crashed one left behind)."""
    config = files.config()
    state_dir = config.project_dir / ".tpconf"
    snapshot = state.read(state_dir)
    if snapshot is not None and snapshot.alive:
        snapshot = anyio.run(partial(_live_snapshot, state_dir, snapshot), backend="asyncio")
    if snapshot is not None and names:
        known = {row.name for row in snapshot.deployments}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise TpconfError(
                f"tpconf up runs no deployment {unknown[0]} (it runs: "
                f"{', '.join(sorted(known)) or 'none'})",
                hint="name a deployment it runs, or start it with `tpconf up NAME`",
            )
        rows = tuple(row for row in snapshot.deployments if row.name in names)
        snapshot = state.Snapshot(**{**asdict(snapshot), "deployments": rows})
    alive = snapshot is not None and snapshot.alive
    left = [] if alive else anyio.run(partial(_cluster_leftovers, config, names), backend="asyncio")
    if as_json:
        click.echo(json.dumps(_status_json(snapshot, alive, left), indent=2))
        return EXIT_OK if alive else EXIT_FAILURE
    console = _console(stderr=False)
    if snapshot is not None and alive:
        console.print(f"tpconf up is running (pid {snapshot.pid}, session {snapshot.session})")
        print_status(snapshot)
        return EXIT_OK
    if snapshot is None:
        console.print("tpconf up is not running here")
    else:
        console.print(
            _text(
                f"tpconf up (pid {snapshot.pid}) ended without cleaning up; "
                "run `tpconf down` to restore the cluster",
                style="yellow",
            )
        )
        print_status(snapshot)
    if left:
        console.print("left in the cluster by this project (`tpconf down` cleans up):")
        for line in left:
            console.print(f"  {line}")
    return EXIT_FAILURE


async def _live_snapshot(state_dir: Path, written: state.Snapshot) -> state.Snapshot:
    """What the running ``up`` says now (a process may have restarted since it last wrote its
    state file); the file's snapshot if it does not answer."""
    try:
        reply = await control.request(state_dir, {"op": "status"})
        return state.Snapshot.from_json(str(reply["snapshot"]))
    except (TpconfError, KeyError, ValueError, TypeError):
        return written


def _status_json(
    snapshot: state.Snapshot | None, alive: bool, left: list[str]
) -> dict[str, object]:
    """``status --json``: ``up`` is ``running``, ``crashed`` (left its state) or ``stopped``."""
    rows = [
        {**asdict(row), "exposes": list(row.exposes), "problem": row.problem()}
        for row in (snapshot.deployments if snapshot else ())
    ]
    return {
        "up": "running" if alive else "crashed" if snapshot is not None else "stopped",
        "pid": snapshot.pid if snapshot else None,
        "session": snapshot.session if snapshot else None,
        "config": snapshot.config if snapshot else None,
        "started": snapshot.started if snapshot else None,
        "deployments": rows,
        "left_in_cluster": left,
    }


async def _cluster_leftovers(files: ConfigFiles, names: Sequence[str]) -> list[str]:
    from tpconf.reconcile import cleanup

    try:
        project = load_project(files, methods=REGISTRY)
    except TpconfError as exc:
        return [f"(could not check the cluster: {explain(exc).render()})"]
    return await cleanup.cluster_leftovers(_session(files, port_forwards=False), project, names)


@cli.command()
@file_options()
@name_argument()
@click.option(
    "--format", "fmt", type=click.Choice(["dotenv", "json"]), default="dotenv", show_default=True
)
def env(files: Files, name: str, fmt: str) -> None:
    """Print the environment deployment NAME's process gets from the pod (needs `tpconf up`)."""
    reply = anyio.run(
        partial(control.request, _state_dir(files), {"op": "env", "name": name}),
        backend="asyncio",
    )
    values = reply["env"]
    assert isinstance(values, dict)
    mapping = {str(k): str(v) for k, v in values.items()}
    click.echo(to_json(mapping) if fmt == "json" else to_dotenv(mapping), nl=False)


@cli.command(
    "exec",
    context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
)
@file_options()
@name_argument()
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[--] [COMMAND]...")
def exec_command(files: Files, name: str, command: tuple[str, ...]) -> int:
    """Run COMMAND (default: your $SHELL) as deployment NAME's process would run: its
    environment, its network and volumes, attached to this terminal; exits with its exit code.
    Needs `tpconf up`."""
    warn_platform()
    from tpconf.supervisor.env import process_environment

    if command[:1] == ("--",):  # click passes the separator on when parsing stopped before it
        command = command[1:]

    reply = anyio.run(
        partial(control.request, _state_dir(files), {"op": "exec", "name": name}),
        backend="asyncio",
    )
    pod_side, launch_env, prefix = reply.get("env"), reply.get("launch_env"), reply.get("prefix")
    assert isinstance(pod_side, dict) and isinstance(launch_env, dict)
    assert isinstance(prefix, list)
    contained = reply.get("contained") is True
    if contained:  # a container: the pod's side reaches it through the prefix
        env = dict(os.environ)
        shell = "/bin/sh"  # the image's, not this machine's $SHELL
    else:
        env = process_environment(os.environ, {str(k): str(v) for k, v in pod_side.items()})
        shell = os.environ.get("SHELL") or "/bin/sh"
    env.update({str(k): str(v) for k, v in launch_env.items()})
    argv = [*map(str, prefix), *(command or (shell,))]
    program = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env.get("PATH"))
    if program is None:
        print_error(f"{name}: command not found: {argv[0]}")
        return EXIT_NOT_FOUND
    sys.stdout.flush()
    sys.stderr.flush()
    # The command replaces tpconf: it keeps the terminal (or an IDE's pipes), gets its signals
    # directly, and its exit code is the exit code.
    try:
        os.execve(program, argv, env)
    except OSError as exc:
        print_error(f"{name}: cannot run {argv[0]}: {exc.strerror or exc}")
        return 126 if isinstance(exc, PermissionError) else EXIT_NOT_FOUND
    return EXIT_FAILURE  # pragma: no cover - execve returns only by raising


@cli.command()
@file_options(short_file=False)
@names_argument()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until up ends.")
@click.option("-t", "--timestamps", is_flag=True, help="Show when each line was printed.")
@click.option("--tail", type=int, default=None, metavar="N", help="Only the last N lines each.")
def logs(
    files: Files, names: tuple[str, ...], follow: bool, timestamps: bool, tail: int | None
) -> None:
    """Print what the commands of the running (or last) `tpconf up` printed."""
    from tpconf.supervisor.output import follow_logs, read_logs

    state_dir = _state_dir(files)
    directory = state_dir / LOGS_DIR
    if names:
        files.load(names, quiet=True)  # an unknown name is refused
    sink = ConsoleSink()

    def show(record: LogRecord) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.time)) + " " if timestamps else ""
        if record.stream == "notice":
            sink.notice(record.name, stamp + record.text)
        else:
            sink.write(record.name, stamp + record.text, stream=record.stream)

    if not follow:
        for record in read_logs(directory, names, tail=tail):
            show(record)
        return

    def running() -> bool:
        try:
            snapshot = state.read(state_dir)
        except TpconfError:
            return False
        return snapshot is not None and snapshot.alive

    for record in follow_logs(directory, names, tail=tail, running=running):
        show(record)


@cli.command()
@click.option("--context", default=None, metavar="CONTEXT", help="The kubeconfig context.")
@click.option("-n", "--namespace", default=None, metavar="NAMESPACE", help="Where to look.")
@click.argument("names", nargs=-1, metavar="[DEPLOYMENT]...")
@click.option("--all", "everything", is_flag=True, help="Every Deployment of the namespace.")
@click.option("--force", is_flag=True, help="Overwrite an existing telepresence.yaml.")
def init(
    context: str | None,
    namespace: str | None,
    names: tuple[str, ...],
    everything: bool,
    force: bool,
) -> None:
    """Write a commented telepresence.yaml here for Deployments of the cluster (DEPLOYMENT...,
    --all, or picked from a list on a terminal)."""
    from tpconf.reconcile import init as initialize
    from tpconf.reconcile.session import Session

    project_dir = Path.cwd()
    session = Session(project_dir=project_dir, kubectl="kubectl")
    found = anyio.run(partial(initialize.discover, session, context, namespace), backend="asyncio")
    wanted: Sequence[str] = names
    if everything:
        wanted = [f.name for f in found.deployments]
    elif not names and found.deployments:
        if not sys.stdin.isatty():
            raise TpconfError(
                f"which Deployments of namespace {found.namespace}? "
                + ", ".join(f.name for f in found.deployments),
                hint="name them (`tpconf init NAME...`) or take them all (`tpconf init --all`)",
            )
        console = _console(stderr=False)
        console.print(f"Deployments in namespace {found.namespace} ({found.server}):")
        for number, item in enumerate(found.deployments, start=1):
            console.print(f"  {number}. {item.name}")
        answer = click.prompt(
            "Which ones (numbers or names, comma-separated; empty for all)",
            default="",
            show_default=False,
        )
        wanted = [w for w in answer.replace(" ", ",").split(",") if w] or [
            f.name for f in found.deployments
        ]
    picked = initialize.pick(found.deployments, wanted)
    written = initialize.write(project_dir, initialize.config_text(found, picked), force=force)
    console = _console(stderr=False)
    shown = ", ".join(f.name for f in picked) or "an example with `new`"
    console.print(f"wrote {written.config.name} for {shown}")
    console.print(f"wrote {written.schema.relative_to(project_dir)} (the schema, for editors)")
    if written.ignored:
        console.print(f"added to .gitignore: {', '.join(written.ignored)}")
    console.print("next: `tpconf validate`, then `tpconf up`")


@cli.command()
def rbac() -> None:
    """Print the Kubernetes Role (and a RoleBinding to edit) that tpconf needs in a namespace:
    `tpconf rbac | kubectl apply -n NAMESPACE -f -`."""
    from importlib.resources import files as resources

    click.echo(resources("tpconf.cluster").joinpath("rbac.yaml").read_text("utf-8"), nl=False)


def _traceback(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    _console().print(_text(text.rstrip(), style="dim"))


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
