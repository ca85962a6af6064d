"""The evaluation loop against an in-process fake server: scores, undo, resume after an
interruption, and refusal to resume a sequential run on a server whose edits differ."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from editserve.eval.measure import MeasureSettings
from editserve.eval.runner import ResumeError, RunConfig, ServerAlreadyEdited, evaluate
from tests.unit.fake_editserve import FakeServer

RECORDS = [
    {
        "subject": f"Land{i}",
        "prompt": f"Capital of Land{i}?",
        "target_new": f"New{i}",
        "ground_truth": [f"Old{i}"],
        "rephrase_prompt": f"Land{i} capital?",
        "locality": {
            "Relation_Specificity": [
                {"prompt": f"Anthem of Land{i}?", "ground_truth": [f"Song{i}"]}
            ]
        },
    }
    for i in range(4)
]
RECORDS[2]["subject"] = "Nowhere"  # not in its prompt: the server refuses this edit
FACTS = {f"Capital of Land{i}?": f"Old{i}" for i in range(4)} | {
    f"Anthem of Land{i}?": f"Song{i}" for i in range(4)
}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(RECORDS))
    return path


def config(data: Path, out: Path, **kw: object) -> RunConfig:
    settings = MeasureSettings(fluency_tokens=8)
    return RunConfig(
        server="http://fake",
        method="rome",
        data=data,
        out=out,
        settings=settings,
        progress=False,
        **kw,
    )


def run(cfg: RunConfig, server: FakeServer) -> dict:
    return asyncio.run(evaluate(cfg, transport=server.transport()))


def test_independent_run_scores_and_undoes_every_edit(data: Path, tmp_path: Path) -> None:
    server = FakeServer(FACTS)
    result = run(config(data, tmp_path / "out"), server)
    assert server.active() == []
    assert result["edits_applied"] == 3 and [r["index"] for r in result["refused"]] == [2]
    edited, unedited = result["edited"], result["unedited"]
    assert edited["reliability_tf"] == 100.0 and edited["reliability_gen"] == 100.0
    assert unedited["reliability_tf"] == 0.0 and unedited["reliability_gen"] == 0.0
    assert edited["locality_tf"] == 100.0 and edited["locality_gen"] == 100.0
    assert edited["generalization_gen"] == 0.0  # the fake edits only the exact prompt
    # The three applied edits left every anthem answer as it was.
    assert result["probe_counts"]["edited"]["locality"] == {"Relation_Specificity": [3, 3]}
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| unedited |" in markdown and "| rome | 3 / 3 |" in markdown


def test_an_interrupted_run_resumes_without_repeating_work(data: Path, tmp_path: Path) -> None:
    server = FakeServer(FACTS)
    server.fail_on_post = 2  # the second edit never reaches the server
    cfg = config(data, tmp_path / "out")
    with pytest.raises(httpx.ConnectError):
        run(cfg, server)
    server.fail_on_post = None
    result = run(cfg, server)
    assert result["edits_applied"] == 3
    assert server.posts == 5  # 1 done + 1 lost + the remaining 3 (one refused): none twice
    baseline = (tmp_path / "out" / "baseline.jsonl").read_text().splitlines()
    assert len(baseline) == 1 + 4  # the meta line and each record once
    # The run is complete: once more changes nothing.
    assert run(cfg, server)["edited"] == result["edited"] and server.posts == 5


def test_the_unedited_model_is_measured_first_and_an_interrupted_pass_keeps_its_records(
    data: Path, tmp_path: Path
) -> None:
    server = FakeServer(FACTS)
    cfg = config(data, tmp_path / "out", records_in_flight=2)
    # 4 chat answers per record: the pass over the 4 unedited records fails in its third.
    server.fail_on_chat = 4 * 2 + 2
    with pytest.raises(httpx.ConnectError):
        run(cfg, server)
    assert server.posts == 0  # no edit before every record is observed unedited
    kept = (tmp_path / "out" / "baseline.jsonl").read_text().splitlines()
    assert len(kept) >= 1 + 1  # the meta line and at least the records that finished
    server.fail_on_chat = None
    result = run(cfg, server)
    assert result["edits_applied"] == 3
    lines = (tmp_path / "out" / "baseline.jsonl").read_text().splitlines()
    assert lines[: len(kept)] == kept  # what the first pass measured is kept, not redone
    assert sorted(json.loads(x)["index"] for x in lines[1:]) == [0, 1, 2, 3]
    assert result["unedited"]["reliability_gen"] == 0.0


def test_runs_over_more_records_share_the_unedited_observations(data: Path, tmp_path: Path) -> None:
    server = FakeServer(FACTS)
    shared = tmp_path / "baseline.jsonl"
    run(config(data, tmp_path / "two", n=2, baseline=shared), server)
    run(config(data, tmp_path / "all", sequential=True, baseline=shared), server)
    lines = shared.read_text().splitlines()
    # Records 0 and 1 were observed once, by the first run; the second added 2 and 3.
    assert [json.loads(x)["index"] for x in lines[1:3]] == [0, 1]
    assert sorted(json.loads(x)["index"] for x in lines[1:]) == [0, 1, 2, 3]
    other = config(data, tmp_path / "seed", baseline=shared)
    other.settings = MeasureSettings(fluency_tokens=8, seed=1)
    with pytest.raises(ResumeError, match="other data or settings"):
        run(other, server)


def test_an_edit_left_applied_by_a_crash_is_undone_on_resume(data: Path, tmp_path: Path) -> None:
    server = FakeServer(FACTS)
    server.fail_on_delete = True
    cfg = config(data, tmp_path / "out")
    with pytest.raises(httpx.ConnectError):
        run(cfg, server)
    assert len(server.active()) == 1
    server.fail_on_delete = False
    run(cfg, server)
    assert server.active() == []


def test_an_edit_whose_reply_was_lost_is_found_and_undone_on_resume(
    data: Path, tmp_path: Path
) -> None:
    server = FakeServer(FACTS)
    server.lose_reply_on_post = 2  # applied on the server; the run never learns its id
    cfg = config(data, tmp_path / "out")
    with pytest.raises(httpx.ReadError):
        run(cfg, server)
    assert len(server.active()) == 1
    server.lose_reply_on_post = None
    result = run(cfg, server)
    assert server.active() == []
    assert result["edits_applied"] == 3  # record 1 was measured once, on its own edit


def test_a_run_that_requires_the_unedited_model_refuses_an_edited_server(
    data: Path, tmp_path: Path
) -> None:
    server = FakeServer(FACTS)
    server.edits["edit-left"] = {"status": "applied", "requests": [], "version": 1}
    with pytest.raises(ServerAlreadyEdited, match="edit-left"):
        run(config(data, tmp_path / "out", require_unedited=True), server)
    assert server.posts == 0


def test_a_changed_run_is_refused(data: Path, tmp_path: Path) -> None:
    server = FakeServer(FACTS)
    run(config(data, tmp_path / "out", n=2), server)
    with pytest.raises(ResumeError, match="differs in method"):
        run(RunConfig(**{**vars(config(data, tmp_path / "out", n=2)), "method": "memit"}), server)


def test_sequential_keeps_the_edits_and_scores_at_checkpoints(data: Path, tmp_path: Path) -> None:
    server = FakeServer(FACTS)
    result = run(config(data, tmp_path / "out", sequential=True, checkpoints=(1, 2)), server)
    assert [c["edits"] for c in result["sequential"]] == [1, 2, 4]
    assert [c["applied"] for c in result["sequential"]] == [1, 2, 3]
    assert len(server.active()) == 3  # kept on the live model
    assert all(c["edited"]["reliability_tf"] == 100.0 for c in result["sequential"])


def test_sequential_resume_continues_and_refuses_edits_not_its_own(
    data: Path, tmp_path: Path
) -> None:
    server = FakeServer(FACTS)
    server.fail_on_post = 2
    cfg = config(data, tmp_path / "out", sequential=True, checkpoints=(1,))
    with pytest.raises(httpx.ConnectError):
        run(cfg, server)
    server.fail_on_post = None
    # An edit past the run's own that is not its next one (other requests) is not adopted.
    server.edits["edit-other"] = {"status": "applied", "requests": [RECORDS[3]], "version": 9}
    with pytest.raises(ResumeError, match="edit-other"):
        run(cfg, server)
    server.edits["edit-other"]["status"] = "undone"
    result = run(cfg, server)
    assert [c["edits"] for c in result["sequential"]] == [1, 4]
    assert len(server.active()) == 3

    other = FakeServer(FACTS)  # a fresh server: none of the run's edits
    with pytest.raises(ResumeError, match="do not match"):
        run(cfg, other)
    server.edits["edit-stranger"] = {"status": "applied", "requests": [], "version": 99}
    with pytest.raises(ResumeError, match="edit-stranger"):
        run(cfg, server)


def test_sequential_resume_adopts_the_edit_whose_reply_was_lost(data: Path, tmp_path: Path) -> None:
    server = FakeServer(FACTS)
    server.lose_reply_on_post = 2  # applied on the server, never logged by the run
    cfg = config(data, tmp_path / "out", sequential=True, checkpoints=(2,))
    with pytest.raises(httpx.ReadError):
        run(cfg, server)
    assert len(server.active()) == 2
    server.lose_reply_on_post = None
    result = run(cfg, server)
    assert server.posts == 4  # the lost edit was not made twice
    assert [c["edits"] for c in result["sequential"]] == [2, 4]
    assert result["sequential"][0]["applied"] == 2
    lines = [json.loads(x) for x in (tmp_path / "out" / "sequence.jsonl").read_text().splitlines()]
    edits = [e for e in lines if e["event"] == "edit"]
    assert [e["index"] for e in edits] == [0, 1, 2, 3]
    assert edits[1]["adopted"] and edits[1]["edit_id"] == server.active()[1]


def test_an_interrupted_checkpoint_is_taken_before_the_next_edit(
    data: Path, tmp_path: Path
) -> None:
    server = FakeServer(FACTS)
    cfg = config(data, tmp_path / "out", sequential=True, checkpoints=(2,))
    # 4 chat answers per record: 16 for the unedited model, then the checkpoint after 2 edits.
    server.fail_on_chat = 16 + 3
    with pytest.raises(httpx.ConnectError):
        run(cfg, server)
    assert server.posts == 2
    server.fail_on_chat = None
    result = run(cfg, server)
    two = json.loads((tmp_path / "out" / "results.json").read_text())["sequential"][0]
    assert two["edits"] == 2 and two["applied"] == 2
    lines = [json.loads(x) for x in (tmp_path / "out" / "sequence.jsonl").read_text().splitlines()]
    checkpoint = next(e for e in lines if e["event"] == "checkpoint")
    assert checkpoint["versions"] == [2]  # scored on the model with exactly two edits
    assert [c["edits"] for c in result["sequential"]] == [2, 4]


def test_an_interrupted_checkpoint_keeps_the_records_it_scored(data: Path, tmp_path: Path) -> None:
    server = FakeServer(FACTS)
    cfg = config(data, tmp_path / "out", sequential=True, checkpoints=(), records_in_flight=1)
    # 4 chat answers per record: 16 unedited, then the final checkpoint over the 3 applied
    # edits (one is refused) fails in its second record.
    server.fail_on_chat = 16 + 4 + 2
    with pytest.raises(httpx.ConnectError):
        run(cfg, server)
    part = tmp_path / "out" / "checkpoint-4.jsonl"
    assert [json.loads(x)["index"] for x in part.read_text().splitlines()] == [0]
    server.fail_on_chat, before = None, server.chats
    result = run(cfg, server)
    assert server.chats - before == 2 * 4  # only the two records not yet scored
    assert result["sequential"][0]["applied"] == 3
    assert result["edited"]["reliability_gen"] == 100.0


def test_sequential_cleanup_undoes_the_run(data: Path, tmp_path: Path) -> None:
    server = FakeServer(FACTS)
    run(config(data, tmp_path / "out", sequential=True, cleanup=True), server)
    assert server.active() == []
