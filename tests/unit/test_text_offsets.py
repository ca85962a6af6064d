"""`text_offset` of /v1/completions on non-ASCII text, and teacher-forced scoring that relies on it.

The tiny byte tokenizer makes one token of every byte, so an emoji, a CJK character or an accented
letter is split over several tokens: each of them must report where its character starts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from editserve.api.offsets import decoded_offsets, encode_with_offsets
from editserve.eval.client import EvalClient
from tests.conftest import build_test_app, byte_tokenizer, tiny_model

MODEL = "tiny-llama"
TEXTS = [
    "The flag of 🇺🇦 is blue and yellow",
    "東京は日本の首都です",
    "Le café crème, naïve",
    "mixed: é 🇺🇦 東 x",
]


def char_starts(text: str) -> list[int]:
    """What each byte token of `text` should report: the index of the character it belongs to."""
    return [i for i, ch in enumerate(text) for _ in ch.encode()]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = build_test_app(tiny_model("llama", max_len=256), tmp_path_factory.mktemp("state"))
    with TestClient(app) as c:
        yield c


def completion(client: TestClient, **body: object) -> dict:
    r = client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_of_split_characters_are_their_character_start(text: str) -> None:
    tokenizer = byte_tokenizer()
    ids, offsets = encode_with_offsets(tokenizer, text)
    assert len(ids) == len(text.encode())  # each character really is split into bytes
    assert offsets == char_starts(text)
    assert decoded_offsets(tokenizer, ids) == char_starts(text)  # the same without a mapping


@pytest.mark.parametrize("text", TEXTS)
def test_echo_text_offset_indexes_the_echoed_text(client: TestClient, text: str) -> None:
    choice = completion(client, prompt=text, max_tokens=0, echo=True, logprobs=0)["choices"][0]
    assert choice["text"] == text
    assert choice["logprobs"]["text_offset"] == char_starts(text)


def test_token_id_prompts_and_generated_tokens_get_the_same_offsets(client: TestClient) -> None:
    text = TEXTS[3]
    ids = byte_tokenizer().encode(text)
    body = {"max_tokens": 6, "echo": True, "logprobs": 0, "temperature": 0, "ignore_eos": True}
    as_text = completion(client, prompt=text, **body)["choices"][0]
    as_ids = completion(client, prompt=ids, **body)["choices"][0]
    assert as_ids["text"] == as_text["text"]
    assert as_ids["logprobs"]["text_offset"] == as_text["logprobs"]["text_offset"]
    offsets = as_text["logprobs"]["text_offset"]
    generated = as_text["text"][len(text) :]
    # The generated tokens' offsets lie in the generated part, in order, within the text.
    assert offsets[: len(ids)] == char_starts(text)
    assert len(offsets) == len(ids) + 6
    assert offsets[len(ids)] == len(text)
    assert offsets == sorted(offsets) and offsets[-1] <= len(text) + len(generated)


def test_streamed_offsets_run_on_across_chunks(client: TestClient) -> None:
    body = {
        "model": MODEL,
        "prompt": "Once 🇺🇦",
        "max_tokens": 12,
        "logprobs": 0,
        "temperature": 0,
        "ignore_eos": True,
    }
    whole = completion(client, **body)["choices"][0]["logprobs"]["text_offset"]
    streamed: list[int] = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            data = line.removeprefix("data: ")
            if line.startswith("data: ") and data != "[DONE]":
                for choice in json.loads(data)["choices"]:
                    if choice["logprobs"]:
                        streamed += choice["logprobs"]["text_offset"]
    assert len(whole) == 12
    assert streamed == whole


def eval_client(client: TestClient) -> EvalClient:
    """The evaluation's own client, talking to the app through the test client."""

    def forward(request: httpx.Request) -> httpx.Response:
        r = client.request(
            request.method, request.url.path, content=request.content, headers=request.headers
        )
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    return EvalClient("http://test", transport=httpx.MockTransport(forward))


@pytest.mark.parametrize(
    "prefix", ["The flag of 🇺🇦", "Who lives in 東京", "He ordered a café", "🇺🇦 is in"]
)
def test_teacher_forcing_scores_exactly_the_target_tokens(client: TestClient, prefix: str) -> None:
    target = " Ukraine 🇺🇦"

    async def score():  # noqa: ANN202
        ec = eval_client(client)
        try:
            await ec.start()
            return await ec.score_target(prefix, target)
        finally:
            await ec.close()

    scored = asyncio.run(score())
    tokenizer = byte_tokenizer()
    assert scored.tokens == [tokenizer.decode([t]) for t in tokenizer.encode(target)]
    assert len(scored.logprobs) == len(target.encode())

