"""Tuning and reporting splits: which records a run reads, and calibrations that refuse the
reporting records."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from editserve.eval.measure import MeasureSettings
from editserve.eval.runner import RunConfig, evaluate
from editserve.eval.splits import (
    REPORT_RECORDS,
    SplitError,
    check_tuning,
    is_train_file,
    load_split,
    split_range,
)
from tests.unit.fake_editserve import FakeServer


def zsre(n: int) -> list[dict]:
    return [
        {
            "subject": f"Land{i}",
            "prompt": f"Capital of Land{i}?",
            "target_new": f"New{i}",
            "rephrase_prompt": f"Land{i} capital?",
        }
        for i in range(n)
    ]


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    path = tmp_path / "ZsRE-test-all.dev.json"
    path.write_text(json.dumps(zsre(130)))
    return path


def test_training_files_are_named_as_the_shared_data_names_them() -> None:
    for name in (
        "train_cf.json",
        "trivia_qa_train.json",
        "wikibio-train-all.json",
        "blender_val.json",
    ):
        assert is_train_file(name), name
    for name in (
        "test_cf.dev.json",
        "recent_train.dev.json",
        "zsre.json",
        "counterfact-val.dev.json",
    ):
        assert not is_train_file(name), name


def test_report_is_the_first_100_records_and_tune_the_rest(dev: Path) -> None:
    _, report = load_split(dev, "report")
    _, tune = load_split(dev, "tune", n=5)
    assert [r.index for r in report] == list(range(REPORT_RECORDS))
    assert [r.index for r in tune] == [100, 101, 102, 103, 104]
    assert tune[0].requests[0]["prompt"] == "Capital of Land100?"
    assert len(load_split(dev, "all")[1]) == 130
    with pytest.raises(SplitError, match="--split all"):
        load_split(dev, "report", n=500)  # the sequential curve must say it reads tuning records


def test_a_short_file_is_all_report_and_a_training_file_all_tune(tmp_path: Path) -> None:
    test = tmp_path / "trivia_qa_test.dev.json"
    train = tmp_path / "trivia_qa_train.json"
    test.write_text("[]")
    train.write_text("[]")
    assert split_range(test, "report", 64) == range(64)
    with pytest.raises(SplitError, match="trivia_qa_train.json"):
        split_range(test, "tune", 64)  # names the training file beside it
    assert split_range(train, "tune", 80) == range(80)
    with pytest.raises(SplitError, match="training file"):
        split_range(train, "report", 80)


def test_sanitation_training_file_reads_as_erasures(tmp_path: Path) -> None:
    train = tmp_path / "trivia_qa_train.json"
    train.write_text(
        json.dumps(
            {
                "K_F": [
                    {
                        "question": "Who wrote Hamlet, the play?",
                        "subject": "Hamlet",
                        "ground_truth": "Shakespeare",
                        "target_new": "I don't know.",
                    }
                ],
                "K_R": [{"question": "What is 2+2?", "ground_truth": "4", "target_new": "4"}],
            }
        )
    )
    fmt, records = load_split(train, "tune")
    assert fmt == "sanitation" and records[0].kind == "erase"
    assert records[0].requests[0]["subject"] == "Hamlet"
    assert records[0].locality["Knowledge_Retained"][0].prompt == "What is 2+2?"


def test_calibration_refuses_reporting_records_unless_forced(dev: Path, tmp_path: Path) -> None:
    with pytest.raises(SplitError, match="reporting split"):
        check_tuning(dev, range(50, 650))
    check_tuning(dev, range(100, 700))
    check_tuning(dev, range(0, 50), force=True)
    check_tuning(tmp_path / "train_cf.json", range(0, 50))  # a training file is all tuning


def test_eval_runs_on_the_split_it_names_and_says_so(dev: Path, tmp_path: Path) -> None:
    server = FakeServer({})
    cfg = RunConfig(
        server="http://fake",
        method="rome",
        data=dev,
        out=tmp_path / "out",
        n=3,
        split="tune",
        settings=MeasureSettings(fluency_tokens=0),
        progress=False,
    )
    result = asyncio.run(evaluate(cfg, transport=server.transport()))
    assert result["split"] == "tune"
    assert result["records"] == "tune split: records 100-102 of ZsRE-test-all.dev.json (3 records)"
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    ]
    assert [r["index"] for r in rows] == [100, 101, 102]
    assert "records 100-102" in (tmp_path / "out" / "results.md").read_text()


def test_a_run_written_before_splits_resumes_as_the_report_split(dev: Path, tmp_path: Path) -> None:
    server = FakeServer({})
    cfg = RunConfig(
        server="http://fake",
        method="rome",
        data=dev,
        out=tmp_path / "out",
        n=2,
        settings=MeasureSettings(fluency_tokens=0),
        progress=False,
    )
    asyncio.run(evaluate(cfg, transport=server.transport()))
    run_json = tmp_path / "out" / "run.json"
    saved = json.loads(run_json.read_text())
    for key in ("split", "records"):  # as an older run.json
        del saved["identity"][key]
    run_json.write_text(json.dumps(saved))
    result = asyncio.run(evaluate(cfg, transport=server.transport()))
    assert result["split"] == "report" and result["edits_applied"] == 2


def test_train_scope_refuses_the_reporting_split(
    dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from editserve.cli import main

    out = tmp_path / "scope.safetensors"
    args = ["train-scope", "--data", str(dev), "--out", str(out), "--skip", "50"]
    assert main(args) == 2
    assert "reporting split" in capsys.readouterr().err and not out.exists()
