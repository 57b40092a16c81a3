"""Where the output of supervised processes goes: ``name | line``, like ``docker compose up``.

:class:`OutputSink` is what :func:`~tpconf.supervisor.process.run_process` writes to: lines,
tpconf's notices, and each exit (as compose's printer gets its containers' exits).
:class:`ConsoleSink` prints to a terminal with one colour per deployment (in the order the
deployments are registered, so colours are stable between runs); :class:`CaptureSink` records
lines for tests and for ``tpconf status``-style views; :class:`LogFiles` keeps what a running
``up`` printed, per deployment, for ``tpconf logs`` (:func:`read_logs`, :func:`follow_logs`).

The log files are ``.tpconf/logs/NAME.log`` (mode 0600: a process may print Secrets), one
record a line: ``TIME STREAM TEXT``, with ``TIME`` in seconds since the epoch and ``STREAM`` one
of ``o`` (stdout), ``e`` (stderr), ``n`` (a notice). A file that reaches :data:`LOG_MAX_BYTES`
becomes ``NAME.log.1`` (replacing the one before) and a new one starts: a deployment keeps at
most twice that. A new ``up`` starts with no logs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal, Protocol, TextIO

if TYPE_CHECKING:
    from tpconf.supervisor.process import ProcessExit

__all__ = [
    "CaptureSink",
    "CapturedLine",
    "ConsoleSink",
    "LogFiles",
    "LogRecord",
    "OutputSink",
    "Stream",
    "Tee",
    "follow_logs",
    "read_logs",
]

Stream = Literal["stdout", "stderr", "notice"]

#: The colours ``docker compose`` cycles through (cyan, yellow, green, magenta, blue, then the
#: bright variants). Red is left for errors.
_COLOURS = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94)


class OutputSink(Protocol):
    """Receives the output of supervised processes, one complete line at a time."""

    def write(self, name: str, line: str, *, stream: Stream = "stdout") -> None:
        """One line (without its newline) that deployment ``name``'s process printed."""
        ...

    def notice(self, name: str, text: str) -> None:
        """A message from tpconf about ``name``'s process, e.g. ``exited with code 1``."""
        ...

    def exited(self, name: str, result: ProcessExit) -> None:
        """``name``'s process ended (its notice was already given)."""
        ...


def colour_wanted(file: TextIO) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return file.isatty()
    except ValueError:  # closed file
        return False


class ConsoleSink:
    """Prints ``name | line`` to ``file`` (stdout by default), names padded to one width.

    ``names`` fixes the colour order and the padding up front (pass the deployments in file
    order); names seen later get the next colour. ``colour=None`` decides from the file and
    ``NO_COLOR``. A closed pipe (``tpconf up | head``) silences the sink instead of failing
    the process it reports on. Without ``file``, each line goes to the ``sys.stdout`` of the
    moment: a live display that redirects it (rich) keeps its lines above the display.
    """

    def __init__(
        self,
        file: TextIO | None = None,
        *,
        names: Iterable[str] = (),
        colour: bool | None = None,
    ) -> None:
        self._given = file
        self._colour = colour_wanted(self._file) if colour is None else colour
        self._colours: dict[str, int] = {}
        self._width = 0
        self._broken = False
        for name in names:
            self.register(name)

    @property
    def _file(self) -> TextIO:
        return self._given if self._given is not None else sys.stdout

    def register(self, name: str) -> None:
        """Give ``name`` its colour and widen the prefix if needed; idempotent."""
        if name not in self._colours:
            self._colours[name] = _COLOURS[len(self._colours) % len(_COLOURS)]
            self._width = max(self._width, len(name))

    def _paint(self, name: str, text: str) -> str:
        self.register(name)
        return f"\x1b[{self._colours[name]}m{text}\x1b[0m" if self._colour else text

    def _emit(self, text: str) -> None:
        if self._broken:
            return
        try:
            self._file.write(text)
            self._file.flush()
        except (BrokenPipeError, ValueError):
            self._broken = True

    def write(self, name: str, line: str, *, stream: Stream = "stdout") -> None:
        self.register(name)
        prefix = self._paint(name, f"{name:<{self._width}} | ")
        self._emit(f"{prefix}{line}\n")

    def notice(self, name: str, text: str) -> None:
        self._emit(self._paint(name, f"{name} {text}") + "\n")

    def exited(self, name: str, result: ProcessExit) -> None:
        pass  # the notice said it


@dataclass(frozen=True)
class CapturedLine:
    """One line a :class:`CaptureSink` received."""

    name: str
    line: str
    stream: Stream


class CaptureSink:
    """Keeps every line in :attr:`lines`, in arrival order. For tests."""

    def __init__(self) -> None:
        self.lines: list[CapturedLine] = []
        self.exits: list[ProcessExit] = []

    def write(self, name: str, line: str, *, stream: Stream = "stdout") -> None:
        self.lines.append(CapturedLine(name, line, stream))

    def notice(self, name: str, text: str) -> None:
        self.lines.append(CapturedLine(name, text, "notice"))

    def exited(self, name: str, result: ProcessExit) -> None:
        self.exits.append(result)

    def of(self, name: str, *streams: Stream) -> list[str]:
        """The lines of ``name``, optionally only those of the given streams."""
        return [
            c.line for c in self.lines if c.name == name and (not streams or c.stream in streams)
        ]


class Tee:
    """Every line, notice and exit to each of ``sinks``, in order."""

    def __init__(self, *sinks: OutputSink) -> None:
        self.sinks = sinks

    def write(self, name: str, line: str, *, stream: Stream = "stdout") -> None:
        for sink in self.sinks:
            sink.write(name, line, stream=stream)

    def notice(self, name: str, text: str) -> None:
        for sink in self.sinks:
            sink.notice(name, text)

    def exited(self, name: str, result: ProcessExit) -> None:
        for sink in self.sinks:
            sink.exited(name, result)


# ---- log files (`tpconf logs`) -------------------------------------------------------------------

#: A deployment's log file is rotated when it reaches this size (the old one is kept as `.1`).
LOG_MAX_BYTES = 1024 * 1024

#: The directory of the log files, inside the state directory.
LOGS_DIR = "logs"

_STREAM_CODES: dict[Stream, str] = {"stdout": "o", "stderr": "e", "notice": "n"}
_CODE_STREAMS: dict[str, Stream] = {code: stream for stream, code in _STREAM_CODES.items()}


@dataclass(frozen=True)
class LogRecord:
    """One line of a log file."""

    time: float
    name: str
    stream: Stream
    text: str


def _log_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.log"


class LogFiles:
    """An :class:`OutputSink` that keeps each deployment's output in ``directory`` (see the
    module docstring). Writes are small appends made as the lines arrive; a file that cannot be
    written stops being written (the terminal still gets everything)."""

    def __init__(self, directory: Path, *, max_bytes: int = LOG_MAX_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._files: dict[str, IO[bytes]] = {}
        self._sizes: dict[str, int] = {}
        self._broken = False

    def clear(self) -> None:
        """Start without the logs of a previous ``up`` (the directory is made, mode 0700)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for old in self.directory.glob("*.log*"):
            old.unlink(missing_ok=True)

    def _open(self, name: str) -> IO[bytes]:
        path = _log_path(self.directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        file = os.fdopen(fd, "ab", buffering=0)
        self._sizes[name] = os.fstat(fd).st_size
        return file

    def _append(self, name: str, stream: Stream, text: str) -> None:
        if self._broken or "/" in name:
            return
        record = f"{time.time():.6f} {_STREAM_CODES[stream]} {text}\n".encode(errors="replace")
        try:
            file = self._files.get(name)
            if file is None:
                file = self._files[name] = self._open(name)
            if self._sizes[name] + len(record) > self.max_bytes and self._sizes[name]:
                file.close()
                path = _log_path(self.directory, name)
                os.replace(path, path.with_name(path.name + ".1"))
                file = self._files[name] = self._open(name)
            file.write(record)
            self._sizes[name] += len(record)
        except OSError:
            self._broken = True

    def write(self, name: str, line: str, *, stream: Stream = "stdout") -> None:
        self._append(name, stream, line)

    def notice(self, name: str, text: str) -> None:
        for line in text.splitlines() or [""]:
            self._append(name, "notice", line)

    def exited(self, name: str, result: ProcessExit) -> None:
        pass  # the notice is in the file

    def close(self) -> None:
        for file in self._files.values():
            with contextlib.suppress(OSError):
                file.close()
        self._files.clear()


def _parse(name: str, raw: bytes) -> LogRecord | None:
    stamp, _, rest = raw.rstrip(b"\n").decode(errors="replace").partition(" ")
    code, _, text = rest.partition(" ")
    try:
        when = float(stamp)
    except ValueError:
        return None
    stream = _CODE_STREAMS.get(code)
    return None if stream is None else LogRecord(when, name, stream, text)


def _names(directory: Path, names: Iterable[str]) -> list[str]:
    wanted = list(names)
    if wanted:
        return wanted
    return sorted({p.name.split(".log")[0] for p in directory.glob("*.log*")})


def _records(path: Path, name: str) -> list[LogRecord]:
    try:
        with path.open("rb") as file:
            return [r for raw in file if (r := _parse(name, raw)) is not None]
    except FileNotFoundError:
        return []


def read_logs(
    directory: Path, names: Iterable[str] = (), *, tail: int | None = None
) -> list[LogRecord]:
    """The kept output of ``names`` (default: every deployment with a log), oldest first, the
    deployments interleaved by time; with ``tail``, only the last ``tail`` lines of each."""
    out: list[LogRecord] = []
    for name in _names(directory, names):
        path = _log_path(directory, name)
        out += _tail(_records(path.with_name(path.name + ".1"), name) + _records(path, name), tail)
    return sorted(out, key=lambda r: r.time)


def _tail(records: list[LogRecord], tail: int | None) -> list[LogRecord]:
    if tail is None:
        return records
    return records[len(records) - tail :] if 0 <= tail < len(records) else records


@dataclass
class _Cursor:
    inode: int = 0
    offset: int = 0
    partial: bytes = b""


def _read_new(directory: Path, name: str, cursor: _Cursor) -> list[LogRecord]:
    """What was appended to ``name``'s log since ``cursor``, across a rotation."""
    path = _log_path(directory, name)
    out: list[LogRecord] = []
    try:
        info = path.stat()
    except FileNotFoundError:
        return out
    if cursor.inode and cursor.inode != info.st_ino:
        rotated = path.with_name(path.name + ".1")
        with contextlib.suppress(FileNotFoundError):
            if rotated.stat().st_ino == cursor.inode:
                out += _chunk(rotated, name, cursor)
        cursor.offset, cursor.partial = 0, b""
    cursor.inode = info.st_ino
    return out + _chunk(path, name, cursor)


def _chunk(path: Path, name: str, cursor: _Cursor) -> list[LogRecord]:
    with path.open("rb") as file:
        file.seek(cursor.offset)
        data = cursor.partial + file.read()
        cursor.offset = file.tell()
    *lines, cursor.partial = data.split(b"\n")
    return [r for raw in lines if (r := _parse(name, raw)) is not None]


def follow_logs(
    directory: Path,
    names: Iterable[str] = (),
    *,
    tail: int | None = None,
    running: Callable[[], bool],
    interval: float = 0.2,
) -> Iterator[LogRecord]:
    """:func:`read_logs`, then each new line as it is written, until ``running()`` is false
    (the ``up`` ended; what it wrote last is still given). Deployments that start logging later
    are followed too when no ``names`` are given."""
    wanted = list(names)
    cursors: dict[str, _Cursor] = {}
    first: list[LogRecord] = []
    for name in _names(directory, wanted):
        path = _log_path(directory, name)
        cursor = cursors[name] = _Cursor()
        rotated = _records(path.with_name(path.name + ".1"), name)
        first += _tail(rotated + _read_new(directory, name, cursor), tail)
    yield from sorted(first, key=lambda r: r.time)
    while True:
        alive = running()
        batch: list[LogRecord] = []
        for name in _names(directory, wanted):
            batch += _read_new(directory, name, cursors.setdefault(name, _Cursor()))
        yield from sorted(batch, key=lambda r: r.time)
        if not alive:
            return
        time.sleep(interval)
