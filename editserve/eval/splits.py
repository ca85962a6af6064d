"""Tuning and reporting splits: which records of a data file may choose a setting.

The reporting split is the first 100 records of each evaluation file (all of a shorter one,
such as Sanitation's 64); docs/results.md reports only those, and nothing is tuned on them.
The tuning split is an evaluation file's records from 100 on, or the whole of a training file.
A training file is named as ../shared/data names them: without `.dev.`, with `train` or `val`
in its name (`train_cf.json`, `trivia_qa_train.json`, `wikibio-train-all.json`,
`blender_val.json`); any other file is an evaluation file. Record indices stay file positions,
so a tuning record is never mistaken for a reporting one.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from editserve.eval import datasets
from editserve.eval.datasets import EvalRecord

REPORT_RECORDS = 100
SPLITS = ("report", "tune", "all")
_TRAIN_NAME = re.compile(r"(^|[^a-z])(train|val)([^a-z]|$)", re.IGNORECASE)


class SplitError(ValueError):
    """A split that does not exist in a file, or tuning asked to read reporting records."""


def is_train_file(path: str | Path) -> bool:
    name = Path(path).name
    return ".dev." not in name and bool(_TRAIN_NAME.search(name))


def _train_siblings(path: Path) -> str:
    found = sorted(p.name for p in path.parent.glob("*.json") if is_train_file(p))
    return f" (beside it: {', '.join(found)})" if found else ""


def split_range(path: str | Path, split: str, total: int) -> range:
    """File positions of `split` in a file of `total` records."""
    path = Path(path)
    if split not in SPLITS:
        raise SplitError(f"unknown split {split!r}: one of {', '.join(SPLITS)}")
    if split == "all":
        return range(total)
    if is_train_file(path):
        if split == "report":
            raise SplitError(
                f"{path.name} is a training file: it has no reporting records "
                "(report on the evaluation file; tune here with --split tune)"
            )
        return range(total)
    if split == "report":
        return range(min(REPORT_RECORDS, total))
    if total <= REPORT_RECORDS:
        raise SplitError(
            f"all {total} records of {path.name} are its reporting split: tune on a training "
            f"file instead{_train_siblings(path)}"
        )
    return range(REPORT_RECORDS, total)


def describe(path: str | Path, split: str, indices: list[int]) -> str:
    """One line naming the records a run reads, for its output."""
    where = f"{indices[0]}-{indices[-1]}" if indices else "none"
    return f"{split} split: records {where} of {Path(path).name} ({len(indices)} records)"


def load_split(
    path: str | Path,
    split: str,
    n: int | None = None,
    seed: int = 0,
    max_probes: int | None = None,
) -> tuple[str, list[EvalRecord]]:
    """(format, the first n records of `split`). Asking the reporting split for more records
    than it has is an error, not a silent cut: the sequential curve needs --split all."""
    fmt, everything = datasets.load(path, None, seed, max_probes)
    span = split_range(path, split, len(everything))
    if split == "report" and n is not None and n > len(span):
        raise SplitError(
            f"the reporting split of {Path(path).name} has {len(span)} records, not {n}: "
            "use --split all for longer runs (the sequential curve), which then reads tuning "
            "records too"
        )
    chosen = everything[span.start : span.stop]
    return fmt, chosen[:n] if n is not None else chosen


def check_tuning(path: str | Path, indices: range | list[int], force: bool = False) -> None:
    """Refuses a calibration that would read reporting records, unless forced."""
    if force or is_train_file(path):
        return
    inside = [i for i in indices if i < REPORT_RECORDS]
    if inside:
        raise SplitError(
            f"records {inside[0]}-{inside[-1]} of {Path(path).name} are in the reporting split "
            f"(its first {REPORT_RECORDS}), which nothing may be tuned on: start at "
            f"{REPORT_RECORDS}, use a training file, or pass --force-report-records to measure "
            "them anyway (the output is then no calibration)"
        )


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force-report-records",
        action="store_true",
        help=f"allow the reporting split (the first {REPORT_RECORDS} records of an evaluation "
        "file): for measuring, never for choosing a setting",
    )
