"""Markdown tables of evaluation summaries."""

from __future__ import annotations

from editserve.eval.report import table


def test_table_keeps_measured_columns_and_marks_gaps() -> None:
    text = table(
        [
            ("unedited", {"reliability_tf": 12.345, "locality_tf": 100.0, "portability_tf": None}),
            ("rome", {"reliability_tf": 95.0, "locality_tf": None}),
        ],
        "method",
    )
    lines = text.splitlines()
    assert lines[0] == "| method | Rel. TF | Loc. TF |"  # no portability was measured anywhere
    assert lines[2] == "| unedited | 12.3 | 100.0 |"
    assert lines[3] == "| rome | 95.0 | — |"
