"""The table: rows, statistics, verdicts, printing and ``results.json``.

A :class:`Row` is one line of the table: a measurement name, a variant, the samples, and
optionally a reference row (same name) whose median its ratio is computed against, and a
target. A row with no samples is a slot: it prints ``pending`` or the reason it was not
measured, never a made-up number.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One line of the table."""

    name: str
    variant: str
    unit: str
    samples: list[float] = field(default_factory=list)
    reference: str | None = None
    """The variant of the same ``name`` this row's ratio is computed against."""
    target: str = ""
    """The performance target (bench/RESULTS.md, "Targets"), in words."""
    check: Callable[[Row, Row | None], bool] | None = None
    """Says whether the target is met, given this row and its reference row."""
    note: str = ""
    status: str = ""
    """``pending`` or ``not measured: why`` for slots; empty for measured rows."""
    higher_is_better: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def low(self) -> float | None:
        return min(self.samples) if self.samples else None

    @property
    def high(self) -> float | None:
        return max(self.samples) if self.samples else None


class NoRatio(Exception):
    """The reference's median is 0, so a ratio to it says nothing.

    ``--quick`` meets this: 2 MB through a bare port-forward can cost less CPU than
    ``getrusage`` counts.
    """


def _ratio(row: Row, ref: Row | None) -> float:
    assert row.median is not None and ref is not None and ref.median is not None
    if not ref.median:
        raise NoRatio
    return row.median / ref.median


def within_ms(limit_ms: float) -> Callable[[Row, Row | None], bool]:
    """Target: median within ``limit_ms`` of the reference's median (rows in ms)."""

    def check(row: Row, ref: Row | None) -> bool:
        assert row.median is not None and ref is not None and ref.median is not None
        return row.median - ref.median <= limit_ms

    return check


def at_least_ratio(ratio: float) -> Callable[[Row, Row | None], bool]:
    """Target: median at least ``ratio`` times the reference's median."""

    def check(row: Row, ref: Row | None) -> bool:
        return _ratio(row, ref) >= ratio

    return check


def at_most_ratio(ratio: float) -> Callable[[Row, Row | None], bool]:
    """Target: median at most ``ratio`` times the reference's median (latency, CPU)."""

    def check(row: Row, ref: Row | None) -> bool:
        return _ratio(row, ref) <= ratio

    return check


def below(limit: float) -> Callable[[Row, Row | None], bool]:
    """Target: median below ``limit`` (in the row's unit)."""

    def check(row: Row, _ref: Row | None) -> bool:
        assert row.median is not None
        return row.median < limit

    return check


class Table:
    """Rows in the order they were added."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def slot(self, name: str, variant: str, status: str = "pending", target: str = "") -> Row:
        return self.add(Row(name, variant, "", status=status, target=target))

    def find(self, name: str, variant: str) -> Row | None:
        for row in self.rows:
            if row.name == name and row.variant == variant:
                return row
        return None

    def ratio(self, row: Row) -> float | None:
        if row.reference is None or row.median is None:
            return None
        ref = self.find(row.name, row.reference)
        if ref is None or not ref.median:
            return None
        return row.median / ref.median

    def verdict(self, row: Row) -> str:
        if not row.samples:
            return row.status or "pending"
        if row.check is None:
            return "-"
        ref = self.find(row.name, row.reference) if row.reference else None
        if row.reference and (ref is None or ref.median is None):
            return "no reference"
        try:
            return "ok" if row.check(row, ref) else "MISS"
        except NoRatio:
            return "no verdict: reference is 0"

    def lines(self) -> list[list[str]]:
        out = [["name", "variant", "median", "min", "max", "ratio", "target", "verdict"]]
        for row in self.rows:
            ratio = self.ratio(row)
            out.append(
                [
                    row.name,
                    row.variant,
                    _fmt(row.median, row.unit),
                    _fmt(row.low, row.unit),
                    _fmt(row.high, row.unit),
                    "" if ratio is None else f"{ratio:.2f}x ({row.reference})",
                    row.target,
                    self.verdict(row),
                ]
            )
        return out

    def render(self, *, markdown: bool = False) -> str:
        lines = self.lines()
        if markdown:
            text = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
            text += [
                "| " + " | ".join(cell.replace("|", "\\|") for cell in ln) + " |"
                for ln in lines[1:]
            ]
            return "\n".join(text)
        widths = [max(len(ln[i]) for ln in lines) for i in range(len(lines[0]))]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(ln, widths, strict=True)).rstrip()
            for ln in lines
        )

    def notes(self) -> list[str]:
        return [f"{row.name} / {row.variant}: {row.note}" for row in self.rows if row.note]

    def to_json(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "meta": meta,
            "rows": [
                {
                    "name": row.name,
                    "variant": row.variant,
                    "unit": row.unit,
                    "median": row.median,
                    "min": row.low,
                    "max": row.high,
                    "n": len(row.samples),
                    "samples": row.samples,
                    "reference": row.reference,
                    "ratio": self.ratio(row),
                    "target": row.target,
                    "verdict": self.verdict(row),
                    "note": row.note,
                    "extra": row.extra,
                }
                for row in self.rows
            ],
        }

    def write_json(self, path: Path, meta: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(meta), indent=2) + "\n")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()
