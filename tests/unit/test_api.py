"""The HTTP API on a tiny random model: shapes, streaming, errors, auth, metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import build_test_app, tiny_model

MODEL = "tiny-llama"
MAX_LEN = 128


def make_client(state_dir: Path, **settings: object) -> TestClient:
    return TestClient(build_test_app(tiny_model("llama", max_len=MAX_LEN), state_dir, **settings))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with make_client(tmp_path_factory.mktemp("state")) as c:
        yield c


def chat(client: TestClient, **body: object):
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
    }
    return client.post("/v1/chat/completions", json={**payload, **body})


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_models_lists_the_served_model(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_error(client.get("/v1/models/other"), 404, code="model_not_found")


def test_chat_completion_shape_and_usage(client: TestClient) -> None:
    r = chat(client)
    assert r.status_code == 200
    assert r.headers["x-editserve-model-version"] == "0"
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert usage["prompt_tokens"] > 0


def test_streamed_chunks_join_to_the_non_streamed_text(client: TestClient) -> None:
    whole = chat(client, max_tokens=20).json()["choices"][0]["message"]["content"]
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi there"}],
            "max_tokens": 20,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20


def test_n_choices_and_stop(client: TestClient) -> None:
    body = chat(client, n=3, temperature=1.0, seed=5).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 36
    text = chat(client, max_tokens=30).json()["choices"][0]["message"]["content"]
    stop = text[4:6]
    stopped = chat(client, max_tokens=30, stop=[stop]).json()["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == text[: text.find(stop)]


def test_chat_logprobs(client: TestClient) -> None:
    body = chat(client, max_tokens=4, logprobs=True, top_logprobs=3).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6  # greedy = top-1


def test_completions_echo_with_prompt_logprobs(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "Paris is",
            "max_tokens": 0,
            "echo": True,
            "logprobs": 1,
        },
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "Paris is"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len("Paris is")  # one byte per token
    assert lp["token_logprobs"][0] is None
    assert all(v < 0 for v in lp["token_logprobs"][1:])
    assert lp["text_offset"] == list(range(len("Paris is")))


def test_completions_several_prompts_and_token_ids(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": ["ab", "cd"],
            "max_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    token_ids = client.app.state.editserve.engine.tokenizer.encode("ab")
    ids = client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": token_ids,
            "max_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
        },
    ).json()
    assert ids["choices"][0]["text"] == r.json()["choices"][0]["text"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, None),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
            "max_tokens",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
            "max_tokens",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -0.5},
            "temperature",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "presence_penalty": 1.0,
            },
            "presence_penalty",
        ),
    ],
)
def test_invalid_chat_requests_get_400(client: TestClient, body: dict, param: str | None) -> None:
    error = assert_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_unknown_model_is_404(client: TestClient) -> None:
    assert_error(chat(client, model="gpt-9"), 404, param="model", code="model_not_found")


def test_max_tokens_beyond_the_context_is_400(client: TestClient) -> None:
    error = assert_error(chat(client, max_tokens=MAX_LEN), 400, code="context_length_exceeded")
    assert str(MAX_LEN) in error["message"]


def test_prompt_longer_than_the_context_is_400(client: TestClient) -> None:
    long = "x" * (MAX_LEN + 10)
    r = chat(client, messages=[{"role": "user", "content": long}], max_tokens=None)
    assert_error(r, 400, code="context_length_exceeded")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": long, "max_tokens": 1})
    assert_error(r, 400, code="context_length_exceeded")


def test_malformed_and_non_object_bodies_are_400(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    r = client.post("/v1/chat/completions", content=b'{"model": "x", ', headers=headers)
    assert "JSON" in assert_error(r, 400)["message"]
    r = client.post("/v1/chat/completions", content=b"[1, 2]", headers=headers)
    assert "JSON object" in assert_error(r, 400)["message"]
    r = client.post("/v1/chat/completions", content=b"hello")
    assert_error(r, 400)


def test_completion_specific_errors(client: TestClient) -> None:
    base = {"model": MODEL, "prompt": "ab"}
    assert_error(
        client.post("/v1/completions", json={**base, "max_tokens": 0}), 400, param="max_tokens"
    )
    assert_error(client.post("/v1/completions", json={**base, "prompt": []}), 400)
    assert_error(
        client.post("/v1/completions", json={**base, "prompt": [10**9]}), 400, param="prompt"
    )
    assert_error(client.post("/v1/completions", json={**base, "suffix": "x"}), 400)
    assert_error(client.post("/v1/completions", json={**base, "logprobs": 50}), 400)


def test_server_still_answers_after_errors(client: TestClient) -> None:
    for _ in range(3):
        client.post(
            "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
        )
    assert chat(client).status_code == 200


def test_unknown_route_is_404_in_openai_shape(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing-here"), 404)


def test_health_and_metrics(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    chat(client)
    text = client.get("/metrics").text
    assert "editserve_batch_size_count" in text
    assert 'editserve_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "editserve_generation_tokens_total" in text


def test_api_key_guards_inference_routes(tmp_path: Path) -> None:
    with make_client(tmp_path, api_key="s3cret") as c:
        assert_error(c.get("/v1/models"), 401, code="invalid_api_key")
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key
