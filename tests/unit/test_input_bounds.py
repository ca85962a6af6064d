"""Bounds on inputs that each drive work: an edit's paraphrases and locality probes, a method's
optimisation steps, a completions call's prompts and choices. Past a bound: a 400 that says
which bound, and nothing changes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from editserve.api.schemas import (
    MAX_LOCALITY,
    MAX_PROBE_CHARS,
    MAX_PROMPTS,
    MAX_REPHRASE,
    CompletionRequest,
    EditRequestIn,
)
from methods.alphaedit import load_alphaedit_hparams
from methods.common import MAX_STEPS
from methods.ft import load_ft_hparams
from methods.grace import load_grace_hparams
from methods.memit import load_memit_hparams
from methods.rome import load_rome_hparams
from tests.conftest import build_test_app, tiny_model
from tests.standin import install_shift, weights_hash

MODEL = "tiny-llama"
REQUEST = {"prompt": "Where is the Eiffel Tower?", "subject": "Eiffel Tower", "target_new": "Rome"}


# -- schemas --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "limit"), [("rephrase", MAX_REPHRASE), ("locality", MAX_LOCALITY)]
)
def test_an_edit_request_takes_a_bounded_number_of_probes(field: str, limit: int) -> None:
    assert limit == 16
    ok = EditRequestIn(**REQUEST, **{field: [f"question {i}?" for i in range(limit)]})
    assert len(ok.as_dict()[field]) == limit
    assert EditRequestIn(**REQUEST, **{field: "just one?"}).as_dict()[field] == ["just one?"]
    with pytest.raises(ValidationError, match=f"at most {limit} .* not {limit + 1}"):
        EditRequestIn(**REQUEST, **{field: [f"q{i}?" for i in range(limit + 1)]})
    with pytest.raises(ValidationError, match=f"at most {MAX_PROBE_CHARS} characters"):
        EditRequestIn(**REQUEST, **{field: ["x" * (MAX_PROBE_CHARS + 1)]})


def test_a_completions_call_takes_a_bounded_number_of_prompts() -> None:
    CompletionRequest(model=MODEL, prompt=["a"] * MAX_PROMPTS)
    CompletionRequest(model=MODEL, prompt=[[1, 2]] * MAX_PROMPTS)
    CompletionRequest(model=MODEL, prompt=list(range(MAX_PROMPTS * 4)))  # one prompt of ids
    for many in (["a"] * (MAX_PROMPTS + 1), [[1]] * (MAX_PROMPTS + 1)):
        with pytest.raises(ValidationError, match=f"at most {MAX_PROMPTS} prompts per call"):
            CompletionRequest(model=MODEL, prompt=many)


LOADERS: dict[str, Callable[..., Any]] = {
    "rome": load_rome_hparams,
    "memit": load_memit_hparams,
    "alphaedit": load_alphaedit_hparams,
    "ft": load_ft_hparams,
    "grace": load_grace_hparams,
}


@pytest.mark.parametrize("method", sorted(LOADERS))
def test_steps_have_a_ceiling_far_above_the_configured_values(method: str) -> None:
    load = LOADERS[method]
    configured = load("llama", 30, None).steps  # the embedded model's tuned defaults
    assert 1 <= configured <= MAX_STEPS // 10
    assert load("llama", 30, {"steps": MAX_STEPS}).steps == MAX_STEPS
    for steps in (MAX_STEPS + 1, 10**9, 0):
        with pytest.raises(ValueError, match=f"steps must be in 1..{MAX_STEPS}, not {steps}"):
            load("llama", 30, {"steps": steps})


# -- the API --------------------------------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    install_shift(monkeypatch)
    with TestClient(build_test_app(tiny_model("llama"), tmp_path)) as c:
        yield c


def version(client: TestClient) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return client.post("/v1/chat/completions", json=body).headers["x-editserve-model-version"]


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (
            {"requests": [{**REQUEST, "locality": ["Who are you?"] * 17}]},
            "requests.0.locality",
            "at most 16 locality prompts per request",
        ),
        (
            {"requests": [{**REQUEST, "rephrase": ["Where is it?"] * 17}]},
            "requests.0.rephrase",
            "at most 16 paraphrases per request",
        ),
        ({"method": "rome", "hparams": {"steps": 100000}}, "hparams", "steps must be in 1..500"),
        ({"method": "ft", "hparams": {"steps": 100000}}, "hparams", "steps must be in 1..500"),
    ],
)
def test_an_edit_past_a_bound_is_400_and_changes_nothing(
    client: TestClient, body: dict, param: str, says: str
) -> None:
    base = weights_hash(client)
    r = client.post("/edits", json={"method": "shift", "requests": [REQUEST], **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert says in error["message"]
    assert weights_hash(client) == base
    assert client.get("/edits").json()["data"] == []
    assert version(client) == "0"


def test_completions_past_the_prompt_or_batch_bound_are_400(client: TestClient) -> None:
    body = {"model": MODEL, "max_tokens": 2}
    r = client.post("/v1/completions", json={**body, "prompt": ["hi"] * (MAX_PROMPTS + 1)})
    assert r.status_code == 400, r.text
    assert f"at most {MAX_PROMPTS} prompts per call" in r.json()["error"]["message"]
    # 8 prompts x 5 choices: more generations than the batch (32) runs at once.
    r = client.post("/v1/completions", json={**body, "prompt": ["hi"] * 8, "n": 5})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "asks for 40 generations" in message and "at most 32 at once" in message
    ok = client.post("/v1/completions", json={**body, "prompt": ["hi"] * 8, "n": 4})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 32
