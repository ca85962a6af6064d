"""DELETE /edits/{id}?rebase=true on a tiny model: all later edits rebased or none, and a failed
rebase leaves the weights bit-identical to a plain undo, the old payloads in place, and every
later edit undoable.

The stand-in method here writes a delta that depends on the weights it is computed on (as real
methods' do), so a rebased delta differs from the old one and a half-done rebase would show.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from editserve.edits import journal as journal_module
from editserve.edits import methods as edit_methods
from editserve.edits.journal import STAGED_MARKER, Journal
from tests.conftest import build_test_app, tiny_model
from tests.standin import compute_shift, install_shift, weights_hash

REQUEST = {"prompt": "Where is the Eiffel Tower?", "subject": "Eiffel Tower", "target_new": "Rome"}
TARGETS = ("Rome", "Berlin", "Madrid", "Oslo")


class Arm:
    """Which failure the next rebase meets (None: none)."""

    failure: str | None = None


@pytest.fixture(autouse=True)
def weight_dependent_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    install_shift(monkeypatch)
    Arm.failure = None

    def compute(ctx, requests, h):  # noqa: ANN001, ANN202
        if Arm.failure == "method raises" and requests[0].target_new == "Oslo":
            raise ValueError("the optimisation diverged")
        delta = compute_shift(ctx, requests, h)
        name = ctx.arch.down_proj_name(h.layer)
        weight = dict(ctx.model.named_parameters())[name]
        (u, v), = delta.low_rank.values()
        u = u * (1 + float(weight.abs().mean()))  # computed on these weights, not others
        if Arm.failure == "delta not finite" and requests[0].target_new == "Oslo":
            u = u * float("nan")
        return replace(delta, low_rank={name: (u, v)})

    spec = edit_methods.METHODS["shift"]
    monkeypatch.setitem(edit_methods.METHODS, "shift", replace(spec, compute=compute))


def serve(state_dir: Path) -> TestClient:
    """The whole server on a tiny model, asked from a loopback address (edits need one)."""
    return TestClient(build_test_app(tiny_model("llama"), state_dir), client=("127.0.0.1", 5000))


def make_edits(client: TestClient) -> list[str]:
    ids = []
    for target in TARGETS:
        r = client.post(
            "/edits",
            json={
                "method": "shift",
                "requests": [{**REQUEST, "target_new": target}],
                "checks": False,
            },
        )
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    return ids


def payload_files(state_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((state_dir / "edits").iterdir())}


def live_state(loaded_dir: Path) -> tuple[str, list[tuple[str, str]]]:
    """The weights and the edit list after a restart on `loaded_dir`."""
    with serve(loaded_dir) as c:
        return weights_hash(c), [(e["id"], e["status"]) for e in c.get("/edits").json()["data"]]


def undo_all_gives_pristine(client: TestClient, ids: list[str]) -> None:
    for edit_id in reversed(ids):
        r = client.delete(f"/edits/{edit_id}")
        assert r.status_code in (200, 409), r.text  # 409: the one undone already
    fresh = tiny_model("llama").model.state_dict()
    live = client.app.state.editserve.engine.model.state_dict()
    assert all(torch.equal(fresh[k], live[k]) for k in fresh)


def plain_undo_reference(tmp_path: Path) -> str:
    """The weights after the same edits and a plain DELETE of the second (no rebase)."""
    with serve(tmp_path / "reference") as ref:
        ids = make_edits(ref)
        assert ref.delete(f"/edits/{ids[1]}").status_code == 200
        return weights_hash(ref)


def test_a_rebase_switches_every_later_payload_and_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with serve(state) as client:
        ids = make_edits(client)
        r = client.delete(f"/edits/{ids[1]}?rebase=true")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["rebased"] == ids[2:] and "rebase_error" not in body
        assert weights_hash(client) != plain_undo_reference(tmp_path)  # really recomputed
        rebased = weights_hash(client)
        journal = Journal(state)
        names = {edit_id: journal.payload_path(edit_id).name for edit_id in ids}
        for edit_id in ids[2:]:  # under new names; the files they replaced are gone
            assert names[edit_id].startswith(edit_id + STAGED_MARKER)
        assert sorted(payload_files(state)) == sorted(names.values())
        assert body["model_version"] == client.get("/health").json()["model_version"]
    assert live_state(state) == (rebased, [(ids[0], "applied"), (ids[1], "undone")] + [
        (edit_id, "applied") for edit_id in ids[2:]
    ])
    with serve(state) as client:
        undo_all_gives_pristine(client, ids)


def fail_payload_write_after(n: int) -> Callable[..., None]:
    real, calls = journal_module.save_file, []

    def save(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kwargs)

    return save


def refuse_switch(*_: object) -> None:
    raise sqlite3.OperationalError("database or disk is full")


@pytest.mark.parametrize(
    "failure", ["method raises", "delta not finite", "payload write refused", "switch refused"]
)
def test_a_failed_rebase_keeps_the_undo_and_the_old_deltas_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """The first later edit is recomputed and re-applied before the second one fails (or, for
    the switch, both are): the old deltas come back all the same, bit for bit."""
    expected = plain_undo_reference(tmp_path)
    state = tmp_path / "state"
    with serve(state) as client:
        ids = make_edits(client)
        files = payload_files(state)
        version = client.get("/health").json()["model_version"]
        with monkeypatch.context() as m:
            Arm.failure = failure
            if failure == "payload write refused":
                m.setattr(journal_module, "save_file", fail_payload_write_after(1))
            if failure == "switch refused":
                m.setattr(journal_module.Journal, "switch_payloads", refuse_switch)
            r = client.delete(f"/edits/{ids[1]}?rebase=true")
            Arm.failure = None
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["deleted"] and body["rebased"] == [] and body["later_edits"] == ids[2:]
        message = body["rebase_error"]
        assert f"the undo of {ids[1]} held" in message and all(i in message for i in ids[2:])
        assert body["model_version"] > version + 1

        assert weights_hash(client) == expected  # the old deltas, bit for bit
        assert payload_files(state) == files  # the old payloads; no staged file left
        statuses = [(e["id"], e["status"]) for e in client.get("/edits").json()["data"]]
        assert statuses == [(ids[0], "applied"), (ids[1], "undone")] + [
            (edit_id, "applied") for edit_id in ids[2:]
        ]
        assert client.get("/health").json()["edits_not_replayed"] == []
    assert live_state(state) == (expected, statuses)  # the journal says what was live
    with serve(state) as client:
        # Each later edit is still in the weights: undoing it works (it answered 500 before).
        assert client.delete(f"/edits/{ids[3]}").status_code == 200
        undo_all_gives_pristine(client, ids)


def test_a_later_edit_undoes_in_the_same_process_after_a_failed_rebase(tmp_path: Path) -> None:
    with serve(tmp_path) as client:
        ids = make_edits(client)
        Arm.failure = "method raises"
        assert "rebase_error" in client.delete(f"/edits/{ids[0]}?rebase=true").json()
        Arm.failure = None
        r = client.delete(f"/edits/{ids[3]}")
        assert r.status_code == 200, r.text
        undo_all_gives_pristine(client, ids)
