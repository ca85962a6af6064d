"""Markdown tables of evaluation summaries."""

from __future__ import annotations

from editserve.eval.report import count_table, run_markdown, table


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


def test_count_table_has_a_column_per_group_seen_in_any_row() -> None:
    text = count_table(
        [
            ("unedited", {"portability": {"Reasoning": [1, 4]}, "locality": {"Other": [3, 3]}}),
            ("rome", {"portability": {"Subject_Aliasing": [2, 5]}, "locality": {"Other": [0, 3]}}),
        ],
        "method",
    )
    lines = text.splitlines()
    assert lines[0] == "| method | Port. Reasoning | Port. Subject_Aliasing | Loc. Other |"
    assert lines[2] == "| unedited | 1 / 4 | — | 3 / 3 |"
    assert lines[3] == "| rome | — | 2 / 5 | 0 / 3 |"


def test_count_table_puts_convsent_targets_first() -> None:
    text = count_table(
        [
            (
                "unedited",
                {
                    "locality": {},
                    "verbatim": {"negative": [0, 50]},
                    "sentiment": {"negative": [3, 50]},
                },
            ),
            (
                "rome",
                {
                    "locality": {},
                    "verbatim": {"negative": [9, 50]},
                    "sentiment": {"negative": [20, 50]},
                },
            ),
        ]
    )
    lines = text.splitlines()
    assert lines[0] == "|  | Rel. target negative | Rel. verbatim negative |"
    assert lines[3] == "| rome | 20 / 50 | 9 / 50 |"


def test_run_markdown_reads_chained_edit_records_whole() -> None:
    counts = {"portability": {"Multi_Hop": [1, 6]}, "locality": {}}
    result = {
        "method": "rome",
        "format": "mquake",
        "data": "MQuAKE-hard.dev.json",
        "model": "tiny",
        "edits_applied": 2,
        "n": 2,
        "sequential": False,
        "unedited": {"reliability_gen": 0.0},
        "edited": {"reliability_gen": 75.0},
        "probe_counts": {
            "unedited": {**counts, "cases": {"all edits recalled": [0, 2]}},
            "edited": {**counts, "cases": {"all edits recalled": [1, 2]}},
        },
    }
    text = run_markdown(result)
    assert "Cases: records of chained edits counted whole" in text
    assert "| rome | 1 / 6 | 1 / 2 |" in text
