"""ConsoleSink: the `name | line` prefix, padding, colours per deployment, NO_COLOR, closed pipes."""

from __future__ import annotations

import io

import pytest

from tpconf.supervisor.output import ConsoleSink


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_are_prefixed_and_names_padded_to_the_longest() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out, names=["api", "frontend"])
    sink.write("api", "listening on 8080")
    sink.write("frontend", "ready", stream="stderr")
    sink.notice("api", "exited with code 0")
    assert out.getvalue() == (
        "api      | listening on 8080\nfrontend | ready\napi exited with code 0\n"
    )


def test_each_deployment_gets_its_colour_in_registration_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = Terminal()
    sink = ConsoleSink(out, names=["api", "web"])
    sink.write("web", "a")
    sink.write("api", "b")
    sink.write("late", "c")
    assert out.getvalue().splitlines() == [
        "\x1b[33mweb | \x1b[0ma",
        "\x1b[36mapi | \x1b[0mb",
        "\x1b[32mlate | \x1b[0mc",
    ]


def test_no_colour_when_no_color_is_set_or_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    out = Terminal()
    ConsoleSink(out).write("web", "plain")
    assert out.getvalue() == "web | plain\n"
    monkeypatch.delenv("NO_COLOR")
    pipe = io.StringIO()
    ConsoleSink(pipe).write("web", "plain")
    assert pipe.getvalue() == "web | plain\n"


def test_a_closed_output_silences_the_sink() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out)
    out.close()
    sink.write("web", "lost")
    sink.notice("web", "exited with code 0")
