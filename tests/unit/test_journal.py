"""The journal: commit order, versions, pending rows, damaged payloads, the base fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editserve.edits.journal import CorruptPayload, Journal, JournalMismatch, fingerprint
from tests.conftest import tiny_model


def payload() -> dict[str, torch.Tensor]:
    return {"dense::w": torch.arange(6.0).reshape(2, 3)}


def test_commit_versions_and_listing(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.begin("a", "rome", "modify", {"x": 1}, payload())
    assert [r.id for r in journal.pending()] == ["a"] and journal.list() == []
    assert journal.mark_applied("a") == 1
    journal.begin("b", "rome", "insert", {}, payload())
    assert journal.mark_applied("b") == 2
    assert journal.mark_undone("a") == 3
    assert [(r.id, r.status) for r in journal.list()] == [("a", "undone"), ("b", "applied")]
    journal.close()
    reopened = Journal(tmp_path)
    assert reopened.version == 3
    assert torch.equal(reopened.load_payload("b")["dense::w"], payload()["dense::w"])


def test_failed_edits_leave_no_payload(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.begin("a", "rome", "modify", {}, payload())
    journal.mark_failed("a")
    assert journal.pending() == [] and not journal.payload_path("a").exists()
    assert journal.get("a").status == "failed" and journal.version == 0


def test_damaged_or_missing_payload_is_detected(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.begin("a", "rome", "modify", {}, payload())
    journal.mark_applied("a")
    path = journal.payload_path("a")
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(CorruptPayload, match="damaged"):
        journal.load_payload("a")
    path.unlink()
    with pytest.raises(CorruptPayload, match="missing"):
        journal.load_payload("a")


def test_a_journal_belongs_to_one_base_model(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.bind(fingerprint(tiny_model("llama", seed=0).model))
    journal.bind(fingerprint(tiny_model("llama", seed=0).model))  # same weights: fine
    with pytest.raises(JournalMismatch, match="another base model"):
        journal.bind(fingerprint(tiny_model("llama", seed=1).model))


def test_sweep_removes_only_payloads_without_a_live_row(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for edit_id in ("kept", "undone", "pending"):
        journal.begin(edit_id, "rome", "modify", {}, payload())
    journal.mark_applied("kept")
    journal.mark_applied("undone")
    journal.mark_undone("undone")
    # A crash after the payload was written but before its row; a crash mid-write.
    (journal.payload_dir / "orphan.safetensors").write_bytes(b"x")
    (journal.payload_dir / "half.tmp").write_bytes(b"x")
    assert sorted(journal.sweep()) == ["half.tmp", "orphan.safetensors"]
    assert sorted(p.name for p in journal.payload_dir.iterdir()) == [
        "kept.safetensors",
        "pending.safetensors",
        "undone.safetensors",
    ]
