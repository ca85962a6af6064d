"""One renderer (editserve.prompts): the chat route feeds the prompts edits are made and checked on.

Methods optimise their targets after `EditContext.chat_prompt(question)` and an edit's checks
answer on the service's served prompt; both must be the token ids the chat route submits to the
engine for the same question, with and without memory entries in the prompt.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from editserve.edits.checks import CHECK_TOKENS
from editserve.prompts import question_prompt, question_text
from tests.conftest import tiny_model
from tests.unit.test_memory_edits_api import EIFFEL, UNRELATED, BagOfWords

MODEL = "tiny-llama"


def build(state_dir: Path, max_len: int = 1024):  # noqa: ANN201
    from editserve.api.app import build_app
    from editserve.config import Settings
    from editserve.edits.journal import Journal
    from editserve.edits.service import EditService
    from editserve.engine.transformers_engine import TransformersEngine
    from editserve.metrics import ServerMetrics

    metrics = ServerMetrics()
    # Room for IKE's demonstrations in byte-level tokens: the facts stay in the prompt.
    engine = TransformersEngine(tiny_model("llama", max_len=max_len), on_step=metrics.on_step)
    edits = EditService(engine, Journal(state_dir), encoder=BagOfWords())
    edits.replay()
    return build_app(Settings(state_dir=state_dir), engine, metrics, edits)


@pytest.fixture
def client(tmp_path: Path):
    with TestClient(build(tmp_path)) as c:
        yield c


def fed(client: TestClient, monkeypatch: pytest.MonkeyPatch, question: str) -> list[int]:
    """The token ids the chat route submits to the engine for `question`, answered in as many
    tokens as an edit's checks are (the memory facts' budget depends on it)."""
    engine = client.app.state.editserve.engine
    submitted: list[list[int]] = []
    submit_group = engine.submit_group

    def record(jobs: list, *args: object, **kwargs: object) -> object:
        submitted.extend(list(prompt) for prompt, _ in jobs)
        return submit_group(jobs, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "submit_group", record)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": CHECK_TOKENS,
            "temperature": 0,
        }
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(submitted[-1])
    return submitted[-1]


def test_without_memory_edits_the_route_feeds_the_edit_context_prompt(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    edits = client.app.state.editserve.edits
    for question in (EIFFEL["prompt"], UNRELATED):
        ids = fed(client, monkeypatch, question)
        assert ids == edits.context.chat_prompt(question)
        assert ids == edits.served_prompt(question)
        assert ids == question_prompt(edits.tokenizer, question)  # what the bench scripts use
        text = question_text(edits.tokenizer, question)
        assert edits.tokenizer(text, add_special_tokens=False)["input_ids"] == ids


@pytest.mark.parametrize("method", ["ike", "ice"])
def test_with_a_memory_edit_the_route_feeds_the_served_prompt(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    edits = client.app.state.editserve.edits
    body = {"requests": [{**EIFFEL, "target_new": "Rome"}], "checks": False}
    r = client.post("/edits", json={"method": method, "hparams": {"threshold": 0.5}, **body})
    assert r.status_code == 200, r.text

    asked = fed(client, monkeypatch, EIFFEL["prompt"])
    assert asked == edits.served_prompt(EIFFEL["prompt"])
    plain = edits.context.chat_prompt(EIFFEL["prompt"])
    assert len(asked) > len(plain)  # the fact went in (edits are optimised without it)
    assert "Rome" in edits.tokenizer.decode(asked)

    unrelated = fed(client, monkeypatch, UNRELATED)  # out of the entry's scope
    assert unrelated == edits.served_prompt(UNRELATED) == edits.context.chat_prompt(UNRELATED)


def test_the_route_refuses_a_model_without_a_chat_template(client: TestClient) -> None:
    client.app.state.editserve.engine.tokenizer.chat_template = None
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "this model has no chat template; use /v1/completions with a plain prompt",
        "type": "invalid_request_error",
        "param": "messages",
        "code": None,
    }


def test_the_route_reports_what_the_chat_template_refused(client: TestClient) -> None:
    tokenizer = client.app.state.editserve.engine.tokenizer
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (
        error["message"]
        == "the messages do not fit the model's chat template: roles must alternate"
    )
    assert error["param"] == "messages" and error["code"] is None
