"""The embedded model through a live server and the official `openai` client."""

from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest

from tests.integration.conftest import API_KEY, MODEL

pytestmark = pytest.mark.integration

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_answers_a_fact(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10


def test_stream_joins_to_the_same_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    whole = (
        client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
        .choices[0]
        .message.content
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completion_echo_scores_the_prompt(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL,
        prompt="The capital of France is Paris",
        max_tokens=1,
        echo=True,
        logprobs=1,
        temperature=0,
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("The capital of France is Paris")
    assert lp.token_logprobs[0] is None
    assert lp.tokens[:6] == ["The", " capital", " of", " France", " is", " Paris"]
    # the model knows this fact: " Paris" is likely after "The capital of France is"
    assert lp.token_logprobs[5] > -2.0


def test_eight_concurrent_requests_are_batched(server: str) -> None:
    def batched_steps() -> float:
        text = httpx.get(f"{server}/metrics").text
        count = float(re.search(r"^editserve_batch_size_count (\S+)", text, re.M).group(1))
        le1 = float(
            re.search(r'^editserve_batch_size_bucket\{le="1\.0"\} (\S+)', text, re.M).group(1)
        )
        return count - le1

    before = batched_steps()
    aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY)

    async def ask(i: int) -> str:
        r = await aclient.chat.completions.create(
            model=MODEL,
            temperature=0,
            max_tokens=24,
            extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Count from {i} to {i + 10}."}],
        )
        return r.choices[0].message.content

    async def all_of_them() -> list[str]:
        try:
            return await asyncio.gather(*(ask(i) for i in range(8)))
        finally:
            await aclient.close()

    answers = asyncio.run(all_of_them())
    assert len(answers) == 8 and all(answers)
    assert batched_steps() - before > 0, "no decode step ran more than one request at once"


def test_wrong_or_missing_key_is_refused(server: str) -> None:
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.post(f"{server}/v1/chat/completions", json={}).status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200


def test_bad_requests_raise_clear_client_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=CAPITAL)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=-1)


def test_a_client_that_leaves_frees_its_batch_row(client: openai.OpenAI, server: str) -> None:
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=CAPITAL,
        max_tokens=2000,
        stream=True,
        extra_body={"ignore_eos": True},
    ) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    # the connection is closed; the engine must drop the request instead of generating 2000 tokens
    for _ in range(100):
        if httpx.get(f"{server}/health").json()["running"] == 0:
            return
        asyncio.run(asyncio.sleep(0.1))
    pytest.fail("the abandoned request is still generating")
