"""The journal: commit order, versions, pending rows, damaged payloads, the base fingerprint."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from editserve.edits import journal as journal_module
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


def applied_pair(journal: Journal) -> None:
    for edit_id in ("a", "b"):
        journal.begin(edit_id, "rome", "modify", {}, payload())
        journal.mark_applied(edit_id)


def rebased() -> dict[str, torch.Tensor]:
    return {"dense::w": -torch.arange(6.0).reshape(2, 3)}


def test_a_rebased_payload_is_staged_under_a_new_name_then_switched_in(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    applied_pair(journal)
    staged = [journal.stage_payload(edit_id, rebased()) for edit_id in ("a", "b")]
    # Staged: durable, but the rows (and so a replay) still name the old payloads.
    assert all((journal.payload_dir / s.name).is_file() for s in staged)
    assert journal.payload_path("a").name == "a.safetensors"
    assert torch.equal(journal.load_payload("a")["dense::w"], payload()["dense::w"])

    journal.switch_payloads(staged)
    journal.close()
    reopened = Journal(tmp_path)
    for edit_id, new in zip(("a", "b"), staged, strict=True):
        assert reopened.payload_path(edit_id).name == new.name
        assert torch.equal(reopened.load_payload(edit_id)["dense::w"], rebased()["dense::w"])
    # The replaced files are gone; nothing is left for the sweep.
    assert sorted(p.name for p in reopened.payload_dir.iterdir()) == sorted(s.name for s in staged)
    assert reopened.sweep() == []


def test_the_switch_is_all_or_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    applied_pair(journal)
    before = sorted(p.name for p in journal.payload_dir.iterdir())
    staged = [journal.stage_payload(edit_id, rebased()) for edit_id in ("a", "b")]
    journal.mark_undone("b")  # the second row cannot switch: the first must not either
    with pytest.raises(ValueError, match="not applied"):
        journal.switch_payloads(staged)
    assert journal.payload_path("a").name == "a.safetensors"
    assert torch.equal(journal.load_payload("a")["dense::w"], payload()["dense::w"])
    journal.discard(staged)
    assert sorted(p.name for p in journal.payload_dir.iterdir()) == before


def test_a_crash_on_either_side_of_the_switch_leaves_every_edit_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before the switch: the staged file is an orphan, the row still names a whole old file.
    journal = Journal(tmp_path)
    applied_pair(journal)
    staged = journal.stage_payload("a", rebased())
    assert journal.sweep() == [staged.name]
    assert torch.equal(journal.load_payload("a")["dense::w"], payload()["dense::w"])

    # After the switch committed, before the old file was deleted (the process died there).
    class Died(BaseException):
        pass

    def die(name: str) -> None:
        if name == "after_rebase_switch":
            raise Died

    monkeypatch.setattr(journal_module, "crash_point", die)
    staged = journal.stage_payload("a", rebased())
    with pytest.raises(Died):
        journal.switch_payloads([staged])
    journal.close()
    reopened = Journal(tmp_path)
    assert reopened.sweep() == ["a.safetensors"]
    assert torch.equal(reopened.load_payload("a")["dense::w"], rebased()["dense::w"])
    assert torch.equal(reopened.load_payload("b")["dense::w"], payload()["dense::w"])


def test_a_journal_written_before_payload_names_opens_and_loads(tmp_path: Path) -> None:
    old_schema = journal_module._SCHEMA.replace(
        'payload_name TEXT,             -- its payload file in edits/; NULL: "<id>.safetensors"\n',
        "",
    )
    assert "payload_name" not in old_schema
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    db.executescript(old_schema)
    (tmp_path / "edits").mkdir()
    digest = journal_module.write_payload(tmp_path / "edits" / "a.safetensors", payload())
    db.execute(
        "INSERT INTO edits (id, method, kind, spec, status, payload_sha256, created_at) "
        "VALUES ('a', 'rome', 'modify', '{}', 'applied', ?, 0)",
        (digest,),
    )
    db.commit()
    db.close()
    journal = Journal(tmp_path)
    assert torch.equal(journal.load_payload("a")["dense::w"], payload()["dense::w"])
    assert journal.sweep() == []
