"""Scoped edits (scope "question") through POST/GET/DELETE /edits and the chat route, on a tiny
model with the stand-in method and a stand-in sentence encoder (hashed bag of words).

What is tested is the machinery: only requests within an edit's scope run with its delta (and
those equal the globally edited model's answer), every other request is bit-identical to the
unedited model, the weights never change, undo and replay, the newest edit of a fact shadows
an older one, and bad scopes are refused with nothing changed. The real encoder and ROME are
exercised on the embedded model in tests/integration/test_scoped_edits.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.standin import install_shift, weights_hash
from tests.unit.test_memory_edits_api import build

MODEL = "tiny-llama"
EIFFEL = {
    "prompt": "In which city is the Eiffel Tower?",
    "subject": "Eiffel Tower",
    "rephrase": ["Where is the Eiffel Tower located?"],
}
IN_SCOPE = ["In which city is the Eiffel Tower?", "Which city is the Eiffel Tower in?"]
SAME_SUBJECT = ["When was the Eiffel Tower built?", "Who designed the Eiffel Tower?"]
UNRELATED = ["Who wrote a play about two lovers from Verona?", "What is the capital of Japan?"]


@pytest.fixture(autouse=True)
def shift_method(monkeypatch: pytest.MonkeyPatch) -> None:
    install_shift(monkeypatch)


def ask(client: TestClient, question: str) -> tuple[list[str], str, str]:
    """Greedy answer tokens, the scoped-edits header, the model version."""
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": True,
        },
    )
    assert r.status_code == 200, r.text
    tokens = [t["token"] for t in r.json()["choices"][0]["logprobs"]["content"]]
    return (
        tokens,
        r.headers.get("x-editserve-scoped-edits", ""),
        r.headers["x-editserve-model-version"],
    )


def edit(client: TestClient, target: str = "Rome", **body: object):
    request = {**EIFFEL, "target_new": target}
    return client.post(
        "/edits", json={"method": "shift", "requests": [request], "checks": False, **body}
    )


def test_a_scoped_edit_reaches_its_scope_and_nothing_else(tmp_path: Path) -> None:
    with TestClient(build(tmp_path / "global")) as plain:
        before = {q: ask(plain, q)[0] for q in IN_SCOPE + SAME_SUBJECT + UNRELATED}
        assert edit(plain).status_code == 200
        globally = {q: ask(plain, q)[0] for q in IN_SCOPE}
    with TestClient(build(tmp_path / "scoped")) as client:
        pristine = weights_hash(client)
        r = edit(client, scope="question")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["scope"] == "question" and body["status"] == "applied"
        assert weights_hash(client) == pristine  # never written into the weights
        for q in IN_SCOPE:
            tokens, header, version = ask(client, q)
            assert header == body["id"] and version == "1"
            assert tokens == globally[q]  # the row gets exactly the global edit's forward
            assert tokens != before[q]
        for q in SAME_SUBJECT + UNRELATED:
            tokens, header, _ = ask(client, q)
            assert header == "" and tokens == before[q], q  # bit-identical to unedited
        assert client.get(f"/edits/{body['id']}").json()["scope"] == "question"


def test_undo_and_replay_of_a_scoped_edit(tmp_path: Path) -> None:
    with TestClient(build(tmp_path)) as client:
        before = ask(client, IN_SCOPE[0])[0]
        edit_id = edit(client, scope="question").json()["id"]
        edited = ask(client, IN_SCOPE[0])[0]
        assert edited != before
    with TestClient(build(tmp_path)) as client:  # a restart replays it from the journal
        tokens, header, version = ask(client, IN_SCOPE[0])
        assert (tokens, header, version) == (edited, edit_id, "1")
        r = client.delete(f"/edits/{edit_id}")
        assert r.status_code == 200 and r.json()["deleted"]
        tokens, header, _ = ask(client, IN_SCOPE[0])
        assert tokens == before and header == ""
    with TestClient(build(tmp_path)) as client:
        assert ask(client, IN_SCOPE[0])[:2] == (before, "")


def test_a_newer_edit_of_the_same_fact_shadows_the_older(tmp_path: Path) -> None:
    with TestClient(build(tmp_path)) as client:
        older = edit(client, "Rome", scope="question").json()["id"]
        rome = ask(client, IN_SCOPE[0])[0]
        newer = edit(client, "Berlin", scope="question").json()["id"]
        tokens, header, _ = ask(client, IN_SCOPE[0])
        assert header == newer  # the older one is left out, not added on top
        assert client.delete(f"/edits/{newer}").status_code == 200
        tokens, header, _ = ask(client, IN_SCOPE[0])
        assert header == older and tokens == rome


def test_a_scoped_dry_run_previews_only_its_scope(tmp_path: Path) -> None:
    with TestClient(build(tmp_path)) as client:
        body = {"locality": SAME_SUBJECT[:1]}
        request = {**EIFFEL, "target_new": "Rome", **body}
        r = client.post(
            "/edits",
            json={"method": "shift", "scope": "question", "dry_run": True, "requests": [request]},
        )
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["status"] == "dry_run" and out["scope"] == "question"
        unchanged = {p["prompt"]: p["unchanged"] for p in out["checks"]["locality"]}
        assert all(unchanged.values()), unchanged  # out of scope: as before
        assert client.get("/edits").json()["data"] == []


@pytest.mark.parametrize(
    ("method", "scope", "words"),
    [
        ("shift", "everywhere", "should be 'global' or 'question'"),
        ("ft", "question", "dense"),
        ("grace", "question", "retrieved"),
    ],
)
def test_a_scope_a_method_cannot_honour_is_refused(
    tmp_path: Path, method: str, scope: str, words: str
) -> None:
    with TestClient(build(tmp_path)) as client:
        pristine = weights_hash(client)
        request = {**EIFFEL, "target_new": "Rome"}
        r = client.post("/edits", json={"method": method, "scope": scope, "requests": [request]})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert client.get("/edits").json()["data"] == [] and weights_hash(client) == pristine
