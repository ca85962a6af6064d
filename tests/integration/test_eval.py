"""`editserve eval` end to end on the embedded model through a live server: two IKE edits of
facts the model knows, scored through the public API, independent and then sequential."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from editserve.cli import main
from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

RECORDS = [
    {
        "subject": "France",
        "prompt": "What is the capital of France?",
        "target_new": "Lyon",
        "ground_truth": ["Paris"],
        "rephrase_prompt": "Which city is the capital of France?",
        "locality": {
            "Relation_Specificity": [
                {"prompt": "What is the chemical symbol for gold?", "ground_truth": ["Au"]}
            ]
        },
    },
    {
        "subject": "Brazil",
        "prompt": "What language is spoken in Brazil?",
        "target_new": "Spanish",
        "ground_truth": ["Portuguese"],
        "rephrase_prompt": "Which language do people in Brazil speak?",
        "locality": {
            "Relation_Specificity": [
                {"prompt": "Who wrote Romeo and Juliet?", "ground_truth": ["Shakespeare"]}
            ]
        },
    },
]


def evaluate(server: str, data: Path, out: Path, *extra: str) -> dict:
    argv = [
        "eval",
        "--server",
        server,
        "--method",
        "ike",
        "--data",
        str(data),
        "--out",
        str(out),
        "--api-key",
        API_KEY,
        "--fluency-tokens",
        "12",
        "--no-progress",
        "--baseline",
        str(out.parent / "baseline.jsonl"),
        *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_eval_through_the_live_api(server: str, tmp_path: Path) -> None:
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(RECORDS))
    try:
        check(server, data, tmp_path)
    finally:  # the session's server is shared: leave it unedited whatever happened
        for edit_id in _active(server):
            httpx.delete(f"{server}/edits/{edit_id}").raise_for_status()


def check(server: str, data: Path, tmp_path: Path) -> None:
    result = evaluate(server, data, tmp_path / "independent")
    unedited, edited = result["unedited"], result["edited"]
    assert result["edits_applied"] == 2
    assert unedited["reliability_gen"] == 0.0  # the model answers Paris and Portuguese
    assert edited["reliability_gen"] == 100.0 and edited["generalization_gen"] == 100.0
    assert edited["locality_gen"] == 100.0  # IKE leaves unrelated questions alone
    assert unedited["locality_tf"] == 100.0
    assert "| ike |" in (tmp_path / "independent" / "results.md").read_text()
    assert _active(server) == []

    seq = evaluate(server, data, tmp_path / "sequential", "--sequential", "--checkpoints", "1")
    assert [c["edits"] for c in seq["sequential"]] == [1, 2]
    assert len(_active(server)) == 2  # kept on the live model
    # Rerunning the finished run resumes nothing and agrees with the server's edit set.
    assert (
        evaluate(server, data, tmp_path / "sequential", "--sequential", "--checkpoints", "1")[
            "sequential"
        ]
        == seq["sequential"]
    )
    for edit_id in _active(server):
        httpx.delete(f"{server}/edits/{edit_id}").raise_for_status()


def _active(server: str) -> list[str]:
    edits = httpx.get(f"{server}/edits").json()["data"]
    return [e["id"] for e in edits if e["status"] == "applied"]
