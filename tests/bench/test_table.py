"""The bench table judges rows against their references and never fails to print."""

from __future__ import annotations

from collections.abc import Callable

from bench.core import Row, Table, at_least_ratio, at_most_ratio, within_ms

Check = Callable[[Row, Row | None], bool]


def _table(ref_samples: list[float], row_samples: list[float], check: Check) -> Table:
    table = Table()
    table.add(Row("cpu", "bare", "s", samples=ref_samples))
    table.add(Row("cpu", "ours", "s", samples=row_samples, reference="bare", check=check))
    return table


def test_ratio_targets_are_judged() -> None:
    for ref, value, check, verdict in [
        ([1.0], [1.4], at_most_ratio(1.5), "ok"),
        ([1.0], [1.6], at_most_ratio(1.5), "MISS"),
        ([10.0], [9.5], at_least_ratio(0.9), "ok"),
        ([10.0], [8.0], at_least_ratio(0.9), "MISS"),
    ]:
        table = _table(ref, value, check)
        assert table.verdict(table.rows[1]) == verdict


def test_a_reference_of_zero_gives_no_verdict_and_the_table_still_renders() -> None:
    table = _table([0.0, 0.0, 0.0], [0.01], at_most_ratio(1.5))
    assert table.verdict(table.rows[1]) == "no verdict: reference is 0"
    assert "no verdict: reference is 0" in table.render()
    assert table.ratio(table.rows[1]) is None


def test_a_difference_target_accepts_a_reference_of_zero() -> None:
    table = _table([0.0], [0.5], within_ms(1.0))
    assert table.verdict(table.rows[1]) == "ok"


def test_a_missing_reference_is_said() -> None:
    table = Table()
    row = table.add(
        Row("cpu", "ours", "s", samples=[1.0], reference="bare", check=at_most_ratio(1.5))
    )
    assert table.verdict(row) == "no reference"
