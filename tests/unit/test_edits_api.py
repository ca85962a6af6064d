"""POST/GET/DELETE /edits on a tiny model, with a stand-in method whose delta is known.

The stand-in ('shift') writes a seeded rank-one delta: these tests are about the machinery
(validation, ledger, journal, versions, undo, replay, auth), not about a method's quality.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from editserve.edits import methods as edit_methods
from editserve.edits.journal import Journal
from tests.conftest import build_test_app, tiny_model
from tests.standin import compute_shift, install_shift, weights_hash

MODEL = "tiny-llama"
REQUEST = {"prompt": "Where is the Eiffel Tower?", "subject": "Eiffel Tower", "target_new": "Rome"}


@pytest.fixture(autouse=True)
def shift_method(monkeypatch: pytest.MonkeyPatch) -> None:
    install_shift(monkeypatch)


def edit(client: TestClient, **body: object):
    return client.post("/edits", json={"method": "shift", "requests": [REQUEST], **body})


def chat_version(client: TestClient) -> str:
    r = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    return r.headers["x-editserve-model-version"]


@pytest.fixture
def client(tmp_path: Path):
    with TestClient(build_test_app(tiny_model("llama"), tmp_path)) as c:
        yield c


def test_edit_apply_list_and_undo_bit_identical(client: TestClient) -> None:
    base = weights_hash(client)
    r = edit(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "applied" and body["model_version"] == 1
    assert body["id"].startswith("edit-")
    assert body["checks"]["requests"][0]["prompt"] == REQUEST["prompt"]
    assert len(body["checks"]["locality"]) == 3
    assert {"compute_s", "apply_s", "total_s"} <= set(body["timings"])
    assert body["delta"]["model.layers.1.mlp.down_proj.weight"]["rank"] == 1
    assert weights_hash(client) != base
    assert chat_version(client) == "1"

    listed = client.get("/edits").json()
    assert listed["object"] == "list" and [e["id"] for e in listed["data"]] == [body["id"]]
    assert client.get(f"/edits/{body['id']}").json()["checks"] == body["checks"]

    undone = client.delete(f"/edits/{body['id']}").json()
    assert undone["deleted"] and undone["model_version"] == 2 and undone["later_edits"] == []
    assert weights_hash(client) == base
    assert chat_version(client) == "2"
    assert client.get(f"/edits/{body['id']}").json()["status"] == "undone"
    assert client.delete(f"/edits/{body['id']}").status_code == 409
    assert client.delete("/edits/edit-nope").status_code == 404
    assert client.get("/edits/edit-nope").status_code == 404


def test_undoing_the_middle_edit_lists_later_ones_and_rebase_recomputes(client) -> None:
    ids = []
    for target in ("Rome", "Berlin", "Madrid"):
        r = edit(client, requests=[{**REQUEST, "target_new": target}], checks=False)
        ids.append(r.json()["id"])
    r = client.delete(f"/edits/{ids[1]}")
    assert r.json()["later_edits"] == [ids[2]]
    r = client.delete(f"/edits/{ids[0]}?rebase=true").json()
    assert r["rebased"] == [ids[2]] and r["model_version"] > 4
    assert [e["status"] for e in client.get("/edits").json()["data"]] == [
        "undone",
        "undone",
        "applied",
    ]
    client.delete(f"/edits/{ids[2]}")
    fresh = tiny_model("llama").model.state_dict()
    live = client.app.state.editserve.engine.model.state_dict()
    assert all(torch.equal(fresh[k], live[k]) for k in fresh)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"method": "nope"}, 400, "method"),
        ({"kind": "rewrite"}, 400, "kind"),
        ({"requests": []}, 400, "requests"),
        ({"requests": [REQUEST] * 4}, 400, "requests"),
        ({"requests": [{**REQUEST, "subject": "Louvre"}]}, 400, "requests.0.subject"),
        ({"requests": [{**REQUEST, "target_new": "  "}]}, 400, "requests.0.target_new"),
        ({"requests": [{**REQUEST, "target_new": "Rome " * 100}]}, 400, "requests.0.target_new"),
        ({"requests": [{"subject": "Eiffel Tower", "target_new": "Rome"}]}, 400, None),
        ({"hparams": {"layr": 3}}, 400, "hparams"),
        ({"hparams": {"layer": "three"}}, 400, "hparams"),
        ({"hparams": [1, 2]}, 400, "hparams"),
        # A batch with one bad request is refused whole.
        (
            {"method": "memit", "requests": [REQUEST, {**REQUEST, "subject": "Louvre"}]},
            400,
            "requests.1.subject",
        ),
        ({"method": "alphaedit", "hparams": {"layers": [0, 9]}}, 400, "hparams"),
        ({"method": "memit", "hparams": {"layers": "all"}}, 400, "hparams"),
        ({"method": "ft", "hparams": {"norm_constraint": -1}}, 400, "hparams"),
    ],
)
def test_bad_edits_change_nothing(client: TestClient, body: dict, status: int, param) -> None:
    base = weights_hash(client)
    r = edit(client, **body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert len(error["message"]) > 10
    if param is not None:
        assert error["param"] == param
    assert weights_hash(client) == base
    assert client.get("/edits").json()["data"] == []
    assert chat_version(client) == "0"


def test_erase_without_target_uses_a_refusal(client: TestClient) -> None:
    r = edit(
        client, kind="erase", requests=[{k: v for k, v in REQUEST.items() if k != "target_new"}]
    )
    assert r.status_code == 200
    assert r.json()["requests"][0]["target_new"] == "I don't know."


def test_dry_run_changes_nothing(client: TestClient) -> None:
    base = weights_hash(client)
    r = edit(client, dry_run=True)
    assert r.status_code == 200 and r.json()["status"] == "dry_run"
    assert r.json()["checks"]["requests"][0]["after"] is not None
    assert weights_hash(client) == base and client.get("/edits").json()["data"] == []


def test_a_restart_replays_committed_edits_and_drops_half_ones(tmp_path: Path) -> None:
    with TestClient(build_test_app(tiny_model("llama"), tmp_path)) as first:
        kept = edit(first, checks=False).json()["id"]
        gone = edit(first, requests=[{**REQUEST, "target_new": "Oslo"}], checks=False).json()["id"]
        first.delete(f"/edits/{gone}")
        edited = weights_hash(first)
    Journal(tmp_path).begin("edit-half", "shift", "modify", {}, {"dense::x": torch.zeros(1)})
    with TestClient(build_test_app(tiny_model("llama"), tmp_path)) as second:
        assert weights_hash(second) == edited
        assert [(e["id"], e["status"]) for e in second.get("/edits").json()["data"]] == [
            (kept, "applied"),
            (gone, "undone"),
        ]
        assert Journal(tmp_path).get("edit-half").status == "failed"
        assert chat_version(second) == "3"


def test_a_journal_of_another_model_is_refused(tmp_path: Path) -> None:
    with TestClient(build_test_app(tiny_model("llama", seed=0), tmp_path)) as c:
        edit(c, checks=False)
    with pytest.raises(RuntimeError, match="another base model"):
        build_test_app(tiny_model("llama", seed=1), tmp_path)


def test_admin_key_guards_edits(tmp_path: Path) -> None:
    app = build_test_app(tiny_model("llama"), tmp_path, admin_key="root")
    with TestClient(app) as c:
        assert edit(c).status_code == 401
        assert c.get("/edits", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/edits", headers={"Authorization": "Bearer root"}).status_code == 200
    with TestClient(
        build_test_app(tiny_model("llama"), tmp_path / "b"), client=("203.0.113.9", 5000)
    ) as remote:
        r = remote.get("/edits")
        assert r.status_code == 403 and "loopback" in r.json()["error"]["message"]


def test_a_method_sees_the_requests_of_the_weight_edits_in_the_model(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What AlphaEdit's protect_prompts keeps: the active edits, oldest first, undone ones gone."""
    seen: list[list[str]] = []

    def recording(ctx, requests, h):  # noqa: ANN001, ANN202
        seen.append([r.target_new for r in ctx.edited_requests()])
        return compute_shift(ctx, requests, h)

    spec = edit_methods.METHODS["shift"]
    monkeypatch.setitem(edit_methods.METHODS, "shift", replace(spec, compute=recording))
    ids = [
        edit(client, requests=[{**REQUEST, "target_new": t}], checks=False).json()["id"]
        for t in ("Rome", "Berlin")
    ]
    assert client.delete(f"/edits/{ids[0]}").status_code == 200
    edit(client, requests=[{**REQUEST, "target_new": "Madrid"}], checks=False)
    assert seen == [[], ["Rome"], ["Berlin"]]
