"""A state folder that refuses writes (full disk, read-only): a clear 507, nothing changed, and
the server keeps serving; once the folder is fixed, edits work again.

In-process on a tiny model with the stand-in method. The failures are injected where the journal
touches the disk (the payload file, the SQLite commit), as ENOSPC/EROFS would surface there.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from editserve.edits import journal as journal_module
from tests.conftest import build_test_app, tiny_model
from tests.standin import install_shift, weights_hash

REQUEST = {"prompt": "Where is the Eiffel Tower?", "subject": "Eiffel Tower", "target_new": "Rome"}


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    install_shift(monkeypatch)
    with TestClient(build_test_app(tiny_model("llama"), tmp_path)) as c:
        yield c


def edit(client: TestClient):
    return client.post("/edits", json={"method": "shift", "requests": [REQUEST], "checks": False})


def snapshot(client: TestClient, state_dir: Path) -> tuple:
    return (
        weights_hash(client),
        client.get("/health").json()["model_version"],
        client.get("/edits").json()["data"],
        sorted(p.name for p in (state_dir / "edits").iterdir()),
    )


def chat_works(client: TestClient) -> bool:
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
        },
    )
    return r.status_code == 200


def fail_with(error: BaseException):  # noqa: ANN201
    def refuse(*_: object, **__: object) -> None:
        raise error

    return refuse


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EROFS, "Read-only file system"),
    ],
    ids=["full", "read-only"],
)
def test_a_refused_payload_write_is_a_507_and_changes_nothing(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    kept = edit(client).json()["id"]
    before = snapshot(client, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(journal_module, "save_file", fail_with(error))
        r = edit(client)
        assert r.status_code == 507, r.text
        message = r.json()["error"]["message"]
        assert str(tmp_path) in message and error.strerror in message and "nothing" in message
        assert snapshot(client, tmp_path) == before  # no weights, version, row or file changed
        assert chat_works(client)
    assert edit(client).status_code == 200  # the folder is fine again: edits work
    assert client.get(f"/edits/{kept}").json()["status"] == "applied"


def test_a_refused_commit_takes_the_live_change_back(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(client, tmp_path)
    with monkeypatch.context() as m:
        # The weights were written; the row cannot be marked applied: they must go back.
        m.setattr(
            journal_module.Journal,
            "mark_applied",
            fail_with(sqlite3.OperationalError("database or disk is full")),
        )
        r = edit(client)
        assert r.status_code == 507, r.text
        assert "disk is full" in r.json()["error"]["message"]
    assert snapshot(client, tmp_path) == before
    assert chat_works(client) and edit(client).status_code == 200


def test_a_refused_undo_keeps_the_edit(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edit_id = edit(client).json()["id"]
    before = snapshot(client, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(
            journal_module.Journal,
            "mark_undone",
            fail_with(sqlite3.OperationalError("attempt to write a readonly database")),
        )
        r = client.delete(f"/edits/{edit_id}")
        assert r.status_code == 507, r.text
    assert snapshot(client, tmp_path) == before
    assert client.delete(f"/edits/{edit_id}").status_code == 200


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_a_read_only_state_folder_refuses_edits_and_keeps_serving(
    client: TestClient, tmp_path: Path
) -> None:
    payloads = tmp_path / "edits"
    payloads.chmod(0o500)
    try:
        r = edit(client)
        assert r.status_code == 507, r.text
        assert chat_works(client)
    finally:
        payloads.chmod(0o700)
    assert edit(client).status_code == 200
