"""Readings that keep the evaluation from flattering a method: the target leak beside locality,
bare-target answers beside fluency, answers sized to their targets, memory methods' TF columns
printed as n/a, and figures resting on few probes marked with their count."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from editserve.eval.datasets import EvalRecord, Probe
from editserve.eval.measure import MeasureSettings, answer_budget
from editserve.eval.metrics import bare_answer
from editserve.eval.report import run_markdown, table
from editserve.eval.runner import RunConfig, evaluate
from editserve.eval.scoring import probe_counts, score, summarise
from tests.unit.fake_editserve import FakeServer

RECORD = EvalRecord(
    index=0,
    requests=({"prompt": "Capital of Aland?", "subject": "Aland", "target_new": "Lyon"},),
    reliability=(Probe("Capital of Aland?", ("Lyon",)),),
    generalization=(Probe("Aland's capital?", ("Lyon",)),),
    locality={
        "Relation_Specificity": (
            Probe("Anthem of Aland?", ("Song",)),
            Probe("River of Aland?", ("Lyon river",)),
        ),
        "Other": (Probe("Capital of Spain?", ("Madrid",)),),
    },
)


def obs(prompt: str, answer: str) -> dict:
    return {"prompt": prompt, "tokens": [" x"], "top1": [" x"], "answer": answer}


def observed(reliability: str, paraphrase: str, locality: list[str]) -> dict:
    return {
        "reliability": [obs("Capital of Aland?", reliability)],
        "generalization": [obs("Aland's capital?", paraphrase)],
        "portability": {},
        "locality": {
            "Relation_Specificity": [obs("Anthem?", locality[0]), obs("River?", locality[1])],
            "Other": [obs("Spain?", locality[2])],
        },
        "fluency": None,
    }


# The unedited model already names "Lyon" once (its river answer), on the same probes.
PRE = observed("Paris.", "Paris.", ["The anthem is Song.", "The Lyon river.", "Madrid."])
POST = observed("Lyon", "The capital of Aland is Lyon.", ["Lyon.", "The Lyon river.", "Lyon."])


def test_target_leak_is_the_share_naming_the_target_minus_the_unedited_share() -> None:
    m = score(RECORD, POST, PRE)
    # After the edit 3 of 3 locality answers name "Lyon", before it 1 of 3.
    assert m["target_leak_gen"] == pytest.approx(2 / 3)
    assert m["target_leak_gen_probes"] == 3
    assert score(RECORD, PRE, PRE)["target_leak_gen"] == 0.0
    # Counted per locality group too: the edited and the unedited model's raw counts.
    assert probe_counts(RECORD, POST, PRE)["leak"] == {
        "Relation_Specificity": [2, 2],
        "Other": [1, 1],
    }
    assert probe_counts(RECORD, PRE, PRE)["leak"] == {
        "Relation_Specificity": [1, 2],
        "Other": [0, 1],
    }
    assert summarise([m])["target_leak_gen"] == pytest.approx(66.67)


def test_bare_answers_are_successful_answers_that_are_only_the_target() -> None:
    assert bare_answer("Lyon.", ["Lyon"]) and bare_answer("It is Lyon", ["Lyon"])
    assert not bare_answer("The capital of Aland is Lyon.", ["Lyon"])
    assert not bare_answer("Paris", ["Lyon"])  # no success, so not a bare target either
    # A long target said whole and nothing more (WikiBio's sentences) is bare too.
    sentence = "He studied medicine in London and won a gold medal"
    assert bare_answer(sentence + ".", [sentence])
    assert not bare_answer(sentence + ", and then he moved to Paris.", [sentence])
    m = score(RECORD, POST, PRE)
    # Two successful answers: "Lyon" (bare) and a sentence that states the fact (not bare).
    assert m["bare_gen"] == 0.5 and m["bare_gen_probes"] == 2
    assert score(RECORD, PRE, PRE)["bare_gen"] is None  # no successful answer to read


def test_judged_answers_are_sized_to_their_targets() -> None:
    assert answer_budget(3, 24, 8) == 24
    assert answer_budget(30, 24, 8) == 38
    assert answer_budget(30, 24, None) == 24  # the fixed length of runs before sizing


def test_a_long_target_gets_an_answer_long_enough_to_hold_it(tmp_path: Path) -> None:
    long_target = " ".join(f"w{i}" for i in range(30))  # 30 tokens on the fake server
    records = [
        {
            "subject": "Aland",
            "prompt": "Story of Aland?",
            "target_new": long_target,
            "rephrase_prompt": "Aland story?",
            "locality": {"Other": [{"prompt": "Anthem of Aland?", "ground_truth": ["Song"]}]},
        },
        {
            "subject": "Bland",
            "prompt": "Capital of Bland?",
            "target_new": "Lyon",
            "rephrase_prompt": "Bland capital?",
        },
    ]
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps(records))
    known = {"Story of Aland?": "old", "Aland story?": "old", "Anthem of Aland?": "Song"}
    server = FakeServer(known)  # the fake tokenizes a target only after a prompt it knows
    cfg = RunConfig(
        server="http://fake",
        method="rome",
        data=data,
        out=tmp_path / "out",
        settings=MeasureSettings(fluency_tokens=0),
        progress=False,
    )
    asyncio.run(evaluate(cfg, transport=server.transport()))
    asked = server.chat_max_tokens
    assert asked["Story of Aland?"] == 38 and asked["Aland story?"] == 38
    assert asked["Capital of Bland?"] == 24
    assert asked["Anthem of Aland?"] == 16  # locality answers keep their fixed length
    row = json.loads((tmp_path / "out" / "records.jsonl").read_text().splitlines()[0])
    assert row["observed"]["reliability"][0]["max_tokens"] == 38


def test_memory_methods_print_their_teacher_forced_columns_as_not_applicable() -> None:
    rows = [
        ("unedited", {"reliability_tf": 21.5, "reliability_gen": 4.0}),
        ("grace", {"reliability_tf": 21.5, "reliability_gen": 100.0}),
    ]
    lines = table(rows, "method", by_design={"grace"}).splitlines()
    assert lines[2] == "| unedited | 21.5 | 4.0 |"
    assert lines[3] == "| grace | n/a (by design) | 100.0 |"
    result = {
        "method": "ike",
        "format": "knowedit",
        "data": "zsre.json",
        "model": "tiny",
        "edits_applied": 1,
        "n": 1,
        "sequential": False,
        "unedited": {"reliability_tf": 21.5, "locality_tf": 100.0},
        "edited": {"reliability_tf": 21.5, "locality_tf": 100.0},
    }
    text = run_markdown(result)
    assert "| ike | n/a (by design) | n/a (by design) |" in text
    assert "| unedited | 21.5 | 100.0 |" in text
    assert "| rome | 21.5 | 100.0 |" in run_markdown({**result, "method": "rome"})


def test_figures_resting_on_fewer_than_30_probes_carry_their_count() -> None:
    summary = {
        "reliability_gen": 42.0,
        "reliability_gen_probes": 12,
        "locality_gen": 90.0,
        "locality_gen_probes": 300,
    }
    lines = table([("rome", summary)], "method").splitlines()
    assert lines[2] == "| rome | 42.0 (n=12) | 90.0 |"
    # summarise counts probes, not records: one record with 3 locality probes rests on 3.
    s = summarise([score(RECORD, POST, PRE)] * 10)
    assert s["locality_gen_probes"] == 30 and s["reliability_gen_probes"] == 10
    assert "(n=10)" in table([("rome", s)], "method")
    assert "(n=30)" not in table([("rome", s)], "method")
