"""Where the output of supervised processes goes: ``name | line``, like ``docker compose up``.

:class:`OutputSink` is what :func:`~tpconf.supervisor.process.run_process` writes to.
:class:`ConsoleSink` prints to a terminal with one colour per deployment (in the order the
deployments are registered, so colours are stable between runs); :class:`CaptureSink` records
lines for tests and for ``tpconf status``-style views.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, TextIO

__all__ = ["CaptureSink", "CapturedLine", "ConsoleSink", "OutputSink", "Stream"]

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
    the process it reports on.
    """

    def __init__(
        self,
        file: TextIO | None = None,
        *,
        names: Iterable[str] = (),
        colour: bool | None = None,
    ) -> None:
        self._file = file if file is not None else sys.stdout
        self._colour = colour_wanted(self._file) if colour is None else colour
        self._colours: dict[str, int] = {}
        self._width = 0
        self._broken = False
        for name in names:
            self.register(name)

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

    def write(self, name: str, line: str, *, stream: Stream = "stdout") -> None:
        self.lines.append(CapturedLine(name, line, stream))

    def notice(self, name: str, text: str) -> None:
        self.lines.append(CapturedLine(name, text, "notice"))

    def of(self, name: str, *streams: Stream) -> list[str]:
        """The lines of ``name``, optionally only those of the given streams."""
        return [
            c.line for c in self.lines if c.name == name and (not streams or c.stream in streams)
        ]
