"""Memory edits (IKE, ICE, SERAC, GRACE) through POST/GET/DELETE /edits on a tiny model.

The sentence encoder is a stand-in (hashed bag of words, unit norm) so these tests are about the
machinery: retrieval gates the chat prompt, journaling, exact replay, undo in any order with
parameter edits, the GRACE hook on the live model, and bad input. The real encoder and methods
are exercised on the embedded model in tests/integration/test_memory_edits.py.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import tiny_model
from tests.standin import install_shift, weights_hash

MODEL = "tiny-llama"
EIFFEL = {"prompt": "In which city is the Eiffel Tower?", "subject": "Eiffel Tower"}
UNRELATED = "Who wrote a play about two lovers from Verona?"


class BagOfWords:
    """A stand-in sentence encoder: hashed word counts, unit norm, 384 dimensions."""

    dim = 384

    def load(self) -> None:
        pass

    def unavailable(self) -> None:
        return None  # nothing to install

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)

    def encode_query(self, text: str) -> torch.Tensor:
        return self.encode([text])


@pytest.fixture(autouse=True)
def shift_method(monkeypatch: pytest.MonkeyPatch) -> None:
    install_shift(monkeypatch)


def build(state_dir: Path):  # noqa: ANN201
    from editserve.api.app import build_app
    from editserve.config import Settings
    from editserve.edits.journal import Journal
    from editserve.edits.service import EditService
    from editserve.engine.transformers_engine import TransformersEngine
    from editserve.metrics import ServerMetrics

    metrics = ServerMetrics()
    engine = TransformersEngine(tiny_model("llama"), on_step=metrics.on_step)
    edits = EditService(engine, Journal(state_dir), encoder=BagOfWords())
    edits.replay()
    return build_app(Settings(state_dir=state_dir), engine, metrics, edits)


@pytest.fixture
def client(tmp_path: Path):
    with TestClient(build(tmp_path)) as c:
        yield c


def post(client: TestClient, method: str, target: str = "Rome", **body: object):
    body = {"requests": [{**EIFFEL, "target_new": target}], "checks": False, **body}
    return client.post("/edits", json={"method": method, **body})


def chat(client: TestClient, question: str) -> tuple[int, str, str]:
    """Prompt tokens (the rendered prompt's size), the answer, the model version."""
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    content = body["choices"][0]["message"]["content"]
    return body["usage"]["prompt_tokens"], content, r.headers["x-editserve-model-version"]


def state(client: TestClient):  # noqa: ANN201
    return client.app.state.editserve


def conditioned(client: TestClient, messages: list[dict[str, str]]) -> tuple[list, list]:
    """The conversation as the memory conditions it, and the entries used."""
    memory = state(client).edits.memory
    used = memory.retrieve(messages)
    return memory.apply(messages, used), used


@pytest.mark.parametrize("method", ["ike", "ice", "serac"])
def test_a_prompt_memory_edit_conditions_only_related_chats(client: TestClient, method) -> None:
    paraphrase = "Where is the Eiffel Tower located, which city?"
    plain, _, _ = chat(client, EIFFEL["prompt"])
    plain_paraphrase, _, _ = chat(client, paraphrase)
    unrelated, _, _ = chat(client, UNRELATED)
    r = post(client, method, hparams={"threshold": 0.5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "applied" and body["model_version"] == 1
    assert body["memory"] == {"store": "serac" if method == "serac" else "ike", "entries": 1}
    assert client.get(f"/edits/{body['id']}").json()["memory"] == body["memory"]

    edited, _, version = chat(client, EIFFEL["prompt"])
    assert version == "1" and edited > plain  # the fact went into the prompt
    assert chat(client, paraphrase)[0] > plain_paraphrase
    assert chat(client, UNRELATED)[0] == unrelated  # nothing injected
    messages, used = conditioned(client, [{"role": "user", "content": EIFFEL["prompt"]}])
    assert [u["edit_id"] for u in used] == [body["id"]]
    assert "Rome" in messages[-1]["content"]
    demos = any(m["role"] == "assistant" for m in messages)
    assert demos == (method == "ike")

    undone = client.delete(f"/edits/{body['id']}").json()
    assert undone["deleted"] and undone["model_version"] == 2
    assert chat(client, EIFFEL["prompt"])[0::2] == (plain, "2")


@pytest.mark.parametrize("method", ["ike", "ice", "serac"])
def test_a_prompt_memory_erase_is_an_earlier_refusal_and_survives_a_restart(
    tmp_path: Path, method
) -> None:
    """An erased question goes in as an earlier exchange the assistant refused, beside an
    ordinary (ICE) edit's fact line; the journal keeps which entry is which."""
    question = [{"role": "user", "content": EIFFEL["prompt"]}]
    # _with_facts ends each fact line with a period, after the refusal's own (as measured)
    fact_line = "New fact: In which city is the Eiffel Tower? Answer: I don't know.."
    refused = [
        {"role": "user", "content": f"{fact_line}\nUsing the new fact, answer: {EIFFEL['prompt']}"},
        {"role": "assistant", "content": "I don't know."},
    ]
    with TestClient(build(tmp_path)) as first:
        body = {"requests": [EIFFEL], "checks": False, "hparams": {"threshold": 0.5}}
        r = first.post("/edits", json={"method": method, "kind": "erase", **body})
        assert r.status_code == 200, r.text
        erased, used = conditioned(first, question)
        assert [u["edit_id"] for u in used] == [r.json()["id"]]
        assert erased == [*refused, *question]  # no fact line, no demonstrations
        assert post(first, "ice", "Paris", hparams={"threshold": 0.5}).status_code == 200
        both, _ = conditioned(first, question)
    assert both[-3:-1] == refused and both[-1]["content"].endswith(EIFFEL["prompt"])
    assert "Paris" in both[-1]["content"] and "know" not in both[-1]["content"]
    with TestClient(build(tmp_path)) as second:
        assert conditioned(second, question)[0] == both


def test_a_chat_answer_names_the_memory_edits_in_its_prompt(client: TestClient) -> None:
    ike = post(client, "ike", hparams={"threshold": 0.5}).json()["id"]
    serac = post(client, "serac", "Paris", hparams={"threshold": 0.5}).json()["id"]
    header = "x-editserve-memory-edits"

    def ask(question: str, stream: bool = False) -> dict:
        body = {"model": MODEL, "messages": [{"role": "user", "content": question}]}
        r = client.post("/v1/chat/completions", json={**body, "max_tokens": 2, "stream": stream})
        assert r.status_code == 200, r.text
        return r.headers

    assert ask(EIFFEL["prompt"])[header] == f"{ike},{serac}"  # IKE facts first, then SERAC's
    assert ask(EIFFEL["prompt"], stream=True)[header] == f"{ike},{serac}"
    assert header not in ask(UNRELATED)
    client.delete(f"/edits/{ike}")
    assert ask(EIFFEL["prompt"])[header] == serac


def test_the_threshold_gates_retrieval(client: TestClient) -> None:
    assert post(client, "ike", hparams={"threshold": 0.85}).status_code == 200
    plain = chat(client, "Which city is the Eiffel Tower in, please?")[0]
    exact = chat(client, EIFFEL["prompt"])[0]
    assert exact > plain  # only a (near) identical question passes 0.85


def test_grace_edit_hooks_the_live_model_and_undoes_exactly(client: TestClient) -> None:
    base = weights_hash(client)
    _, before, _ = chat(client, EIFFEL["prompt"])
    r = post(client, "grace", hparams={"layer": 1, "radius": 0.5, "steps": 30, "lr": 0.5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["memory"]["store"] == "codebook" and body["memory"]["entries"] == 1
    memory = state(client).edits.memory
    assert len(memory.codebook) == 1 and memory.codebook_layer == 1
    down = state(client).engine.model.model.layers[1].mlp.down_proj
    assert len(down._forward_hooks) == 1
    assert weights_hash(client) == base  # GRACE leaves the weights alone
    # The trained value makes the tiny model's greedy answer start with the target's bytes.
    _, after, version = chat(client, EIFFEL["prompt"])
    assert version == "1" and after != before and after.startswith("R")

    assert client.delete(f"/edits/{body['id']}").json()["deleted"]
    assert len(memory.codebook) == 0 and len(down._forward_hooks) == 0
    assert chat(client, EIFFEL["prompt"])[1] == before


def test_memory_and_parameter_edits_undo_in_any_order_and_replay_exactly(tmp_path) -> None:
    with TestClient(build(tmp_path)) as first:
        base = weights_hash(first)
        ids = [
            post(first, "ike").json()["id"],
            post(first, "shift", hparams={"layer": 0}).json()["id"],
            post(first, "grace", hparams={"layer": 1, "steps": 3}).json()["id"],
            post(first, "serac", "Paris").json()["id"],
            post(first, "grace", "Oslo", hparams={"layer": 1, "steps": 3}).json()["id"],
        ]
        assert first.delete(f"/edits/{ids[2]}").json()["later_edits"] == ids[3:]
        memory = state(first).edits.memory
        saved = {
            "ike": memory.indexes["ike"].to_tensors(),
            "serac": memory.indexes["serac"].to_tensors(),
            "codebook": memory.codebook.to_tensors(),
        }
        weights = weights_hash(first)
        answers = [chat(first, q) for q in (EIFFEL["prompt"], UNRELATED)]
    with TestClient(build(tmp_path)) as second:
        memory = state(second).edits.memory
        assert weights_hash(second) == weights
        assert memory.codebook_layer == 1
        for name, flat in saved.items():
            now = (memory.codebook if name == "codebook" else memory.indexes[name]).to_tensors()
            assert flat.keys() == now.keys()
            assert all(torch.equal(flat[k], now[k]) for k in flat), name
        assert [chat(second, q) for q in (EIFFEL["prompt"], UNRELATED)] == answers
        for edit_id in (ids[3], ids[1], ids[0], ids[4]):  # any order
            assert second.delete(f"/edits/{edit_id}").status_code == 200
        assert weights_hash(second) == base
        assert not memory.has_prompt_entries() and len(memory.codebook) == 0


REQUEST = {**EIFFEL, "target_new": "Rome"}


@pytest.mark.parametrize(
    ("method", "body", "param"),
    [
        ("ike", {"hparams": {"threshold": 1.5}}, "hparams"),
        ("ike", {"hparams": {"top_k": 3}}, "hparams"),
        ("ice", {"hparams": {"demonstrations": True}}, "hparams"),
        ("serac", {"hparams": {"threshold": "high"}}, "hparams"),
        ("serac", {"requests": [REQUEST] * 65}, "requests"),
        ("grace", {"hparams": {"layer": 9}}, "hparams"),
        ("grace", {"hparams": {"steps": 0}}, "hparams"),
        ("grace", {"hparams": {"radius": -1}}, "hparams"),
        ("grace", {"requests": [REQUEST] * 9}, "requests"),
        ("ike", {"requests": [{**REQUEST, "target_new": "  "}]}, "requests.0.target_new"),
        ("serac", {"requests": [{**REQUEST, "target_new": "x" * 400}]}, "requests.0.target_new"),
        ("grace", {"requests": [{**REQUEST, "subject": "Louvre"}]}, "requests.0.subject"),
        ("grace", {"dry_run": True, "hparams": {"steps": 0}}, "hparams"),
        ("ike", {"kind": "rewrite"}, None),
    ],
)
def test_bad_memory_edits_change_nothing(client: TestClient, method, body, param) -> None:
    plain = chat(client, EIFFEL["prompt"])
    r = client.post("/edits", json={"method": method, "requests": [REQUEST], **body})
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert len(error["message"]) > 10
    if param is not None:
        assert error["param"] == param
    assert client.get("/edits").json()["data"] == []
    memory = state(client).edits.memory
    assert not memory.has_prompt_entries() and len(memory.codebook) == 0
    assert chat(client, EIFFEL["prompt"]) == plain


def assert_nothing_registered(client: TestClient) -> None:
    assert client.get("/edits").json()["data"] == []
    memory = state(client).edits.memory
    assert not memory.has_prompt_entries() and len(memory.codebook) == 0
    assert memory.codebook_layer is None and memory.generation == 0
    assert all(not m._forward_hooks for m in state(client).engine.model.modules())


@pytest.mark.parametrize("method", ["ike", "serac", "grace"])
def test_a_memory_dry_run_previews_the_edit_and_registers_nothing(
    client: TestClient, method
) -> None:
    hparams = (
        {"layer": 1, "radius": 0.5, "steps": 30, "lr": 0.5}
        if method == "grace"
        else {"threshold": 0.5}
    )
    plain = chat(client, EIFFEL["prompt"])
    dry = post(client, method, hparams=hparams, dry_run=True, checks=True)
    assert dry.status_code == 200, dry.text
    body = dry.json()
    assert body["dry_run"] and body["status"] == "dry_run" and body["id"] is None
    assert body["model_version"] == 0 and body["memory"]["entries"] == 1
    assert_nothing_registered(client)
    assert chat(client, EIFFEL["prompt"]) == plain  # same prompt, answer and version

    # The preview is what committing the edit gives (greedy answers on the same model).
    real = post(client, method, hparams=hparams, checks=True).json()
    assert real["status"] == "applied" and real["model_version"] == 1
    previewed = [c["after"] for c in body["checks"]["requests"] + body["checks"]["locality"]]
    applied = [c["after"] for c in real["checks"]["requests"] + real["checks"]["locality"]]
    assert previewed == applied
    if method == "grace":  # the trained value shows (as in the test of a real GRACE edit)
        assert previewed[0].startswith("R") and not plain[1].startswith("R")
    else:  # the fact went into the prompt the preview matched
        assert chat(client, EIFFEL["prompt"])[0] > plain[0]


def test_a_dry_run_sees_the_live_memory_and_leaves_it_as_it_was(client: TestClient) -> None:
    kept = post(client, "serac", "Paris", hparams={"threshold": 0.5}).json()["id"]
    grace = post(client, "grace", "Oslo", hparams={"layer": 1, "steps": 3}).json()["id"]
    memory = state(client).edits.memory
    saved = (memory.indexes["serac"].to_tensors(), memory.codebook.to_tensors())
    before = chat(client, EIFFEL["prompt"])
    ike = post(client, "ike", hparams={"threshold": 0.5}, dry_run=True)
    also_grace = post(client, "grace", hparams={"layer": 1, "steps": 3}, dry_run=True)
    for r in (ike, also_grace):
        assert r.status_code == 200 and r.json()["model_version"] == 2, r.text
    # Dry runs on another layer than the live codebook's are refused like real edits.
    wrong = post(client, "grace", hparams={"layer": 0, "steps": 2}, dry_run=True)
    assert wrong.status_code == 400 and "layer 1" in wrong.json()["error"]["message"]
    assert [e["id"] for e in client.get("/edits").json()["data"]] == [kept, grace]
    now = (memory.indexes["serac"].to_tensors(), memory.codebook.to_tensors())
    for old, new in zip(saved, now, strict=True):
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert memory.generation == 1 and memory._bench_hook_on
    assert chat(client, EIFFEL["prompt"]) == before


def test_a_grace_edit_at_another_layer_is_refused(client: TestClient) -> None:
    assert post(client, "grace", hparams={"layer": 1, "steps": 2}).status_code == 200
    r = post(client, "grace", "Oslo", hparams={"layer": 0, "steps": 2})
    assert r.status_code == 400 and "layer 1" in r.json()["error"]["message"]
    assert len(client.get("/edits").json()["data"]) == 1


def forced_scope(log_odds: float):  # noqa: ANN201 (ScopeClassifier)
    """A scope classifier that rates every (query, entry) pair the same."""
    from memory.scope import ScopeClassifier

    classifier = ScopeClassifier(BagOfWords.dim)
    torch.nn.init.zeros_(classifier.net[2].weight)
    torch.nn.init.constant_(classifier.net[2].bias, log_odds)
    return classifier


def test_a_trained_scope_classifier_decides_serac_scope(client: TestClient) -> None:
    plain_asked, plain = chat(client, EIFFEL["prompt"])[0], chat(client, UNRELATED)[0]
    # Cosine alone would fire only on a (near) identical question at this threshold.
    edit_id = post(client, "serac", hparams={"threshold": 0.95}).json()["id"]
    memory = state(client).edits.memory
    asked = [{"role": "user", "content": EIFFEL["prompt"]}]
    unrelated = [{"role": "user", "content": UNRELATED}]
    assert [u["scope"] for u in memory.retrieve(asked)] == ["cosine"]
    assert memory.retrieve(unrelated) == []

    memory.scope = forced_scope(+20.0)  # the classifier, not the entry's threshold, decides
    used = memory.retrieve(unrelated)
    assert [(u["edit_id"], u["scope"]) for u in used] == [(edit_id, "classifier")]
    assert used[0]["score"] == pytest.approx(1.0)
    assert chat(client, UNRELATED)[0] > plain  # the fact went into that prompt
    # A dry run searches its own entries the same way.
    dry = post(client, "serac", "Oslo", dry_run=True, checks=True)
    assert dry.status_code == 200, dry.text

    memory.scope = forced_scope(-20.0)
    assert memory.retrieve(asked) == []
    assert chat(client, EIFFEL["prompt"])[0] == plain_asked  # not even the edit's own question
