"""The continuous-batching engine on tiny random Llama and GPT-2 models."""

from __future__ import annotations

import asyncio

import pytest
import torch

from editserve.engine.request import GenerationResult, OutputStream
from editserve.engine.sampling import SamplingParams
from editserve.engine.transformers_engine import TransformersEngine
from tests.conftest import tiny_model

KINDS = ["llama", "gpt2"]


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def run(engine: TransformersEngine, jobs: list[tuple[list[int], SamplingParams]]) -> list:
    """Submits every job at once and waits for all of them."""

    async def go() -> list[GenerationResult]:
        streams = []
        for prompt, params in jobs:
            stream = OutputStream()
            engine.submit(prompt, params, stream)
            streams.append(stream)
        return [(await s.results())[0] for s in streams]

    return asyncio.run(go())


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest):
    eng = TransformersEngine(tiny_model(request.param), max_batch=8)
    eng.start()
    yield eng
    eng.stop()


def prompts(engine: TransformersEngine) -> list[list[int]]:
    texts = ["Hello", "The capital of France is", "a", "Once upon a time, far away, there"]
    return [engine.tokenizer.encode(t) for t in texts]


def test_greedy_output_is_identical_alone_and_batched(engine: TransformersEngine) -> None:
    alone = [run(engine, [(p, greedy(12))])[0] for p in prompts(engine)]
    together = run(engine, [(p, greedy(12)) for p in prompts(engine)])
    for a, b in zip(alone, together, strict=True):
        assert a.token_ids == b.token_ids
        assert len(a.token_ids) == 12


def test_greedy_matches_a_full_forward_without_cache(engine: TransformersEngine) -> None:
    """The cached decode equals recomputing the whole sequence each step (no cache bugs)."""
    prompt = prompts(engine)[1]
    out = run(engine, [(prompt, greedy(8))])[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            logits = engine.model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    assert out.token_ids == ids[len(prompt) :]


def test_requests_join_a_running_batch(engine: TransformersEngine) -> None:
    long_prompt, short_prompt = prompts(engine)[3], prompts(engine)[0]
    expected_long = run(engine, [(long_prompt, greedy(40))])[0].token_ids
    expected_short = run(engine, [(short_prompt, greedy(5))])[0].token_ids

    async def go() -> tuple[GenerationResult, GenerationResult]:
        first = OutputStream()
        engine.submit(long_prompt, greedy(40), first)
        seen = GenerationResult()
        async for _, chunk in first:  # wait until the first request is decoding...
            seen.add(chunk)
            if len(seen.token_ids) == 10:
                break
        second = OutputStream()
        engine.submit(short_prompt, greedy(5), second)  # ...then join it
        late = (await second.results())[0]
        async for _, chunk in first:
            seen.add(chunk)
        return seen, late

    seen, late = asyncio.run(go())
    assert seen.token_ids == expected_long
    assert late.token_ids == expected_short


def test_max_tokens_and_finish_reason(engine: TransformersEngine) -> None:
    out = run(engine, [(prompts(engine)[0], greedy(7))])[0]
    assert len(out.token_ids) == 7
    assert out.finish_reason == "length"


def test_stop_string_ends_generation_and_is_not_returned(engine: TransformersEngine) -> None:
    prompt = prompts(engine)[1]
    free = run(engine, [(prompt, greedy(30))])[0]
    stop = free.text[5:7]  # a string the model will produce
    assert len(stop) == 2
    out = run(engine, [(prompt, greedy(30, stop=(stop,)))])[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.find(stop)]
    assert stop not in out.text


def test_seed_makes_sampling_reproducible(engine: TransformersEngine) -> None:
    prompt = prompts(engine)[0]
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    a, b = run(engine, [(prompt, params), (prompt, params)])
    assert a.token_ids == b.token_ids
    c = run(
        engine, [(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True))]
    )[0]
    assert c.token_ids != a.token_ids


def test_eos_ends_generation(engine: TransformersEngine) -> None:
    """Declare the 4th greedy token to be EOS: generation must stop right there."""
    prompt = prompts(engine)[1]
    free = run(engine, [(prompt, greedy(10))])[0].token_ids
    eos = free[3]
    engine.eos_ids = frozenset({eos})
    out = run(engine, [(prompt, SamplingParams(max_tokens=10, temperature=0))])[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free[: free.index(eos) + 1]
    assert out.text == engine.tokenizer.decode(free[: free.index(eos)])


def test_prompt_logprobs_match_a_direct_forward(engine: TransformersEngine) -> None:
    prompt = prompts(engine)[1]
    params = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=2)

    async def go():
        stream = OutputStream()
        handle = engine.submit(prompt, params, stream)
        await stream.results()
        return handle.prompt_scores

    scores = asyncio.run(go())
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([prompt])).logits[0].float(), -1)
    expected = logp[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    got = torch.tensor([lp.logprob for lp in scores.logprobs])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert all(len(lp.top) == 2 for lp in scores.logprobs)


def test_aborted_request_leaves_the_batch(engine: TransformersEngine) -> None:
    async def go() -> int:
        stream = OutputStream()
        engine.submit(prompts(engine)[0], greedy(200), stream)
        async for _ in stream:
            break
        stream.abort()
        for _ in range(200):
            if engine.num_running == 0:
                return 0
            await asyncio.sleep(0.01)
        return engine.num_running

    assert asyncio.run(go()) == 0
    # and the engine still serves
    assert len(run(engine, [(prompts(engine)[0], greedy(3))])[0].token_ids) == 3


def test_many_requests_beyond_max_batch_all_finish(engine: TransformersEngine) -> None:
    jobs = [(prompts(engine)[i % 4], greedy(3 + i % 5)) for i in range(20)]  # max_batch is 8
    results = run(engine, jobs)
    assert [len(r.token_ids) for r in results] == [3 + i % 5 for i in range(20)]


def test_weight_changes_wait_for_running_requests_and_prompt_changes_do_not(
    engine: TransformersEngine,
) -> None:
    """run_exclusive waits until the running batch drains; run_between_steps lands between two
    decode steps of a running request. Either way, later requests get the version it set."""
    prompt = prompts(engine)[3]

    async def go(run_change) -> tuple[int, int, int]:  # noqa: ANN001
        first = OutputStream()
        handle = engine.submit(prompt, greedy(60), first)
        tokens = 0
        async for _, chunk in first:  # wait until it is decoding
            tokens += len(chunk.token_ids)
            if tokens >= 5:
                break

        def change() -> int:
            engine.model_version += 1
            return engine.num_running  # requests in flight while the change runs

        left = await asyncio.wrap_future(run_change(change))
        async for _ in first:
            pass
        later = OutputStream()
        late = engine.submit(prompt, greedy(2), later)
        await later.results()
        return left, handle.model_version, late.model_version

    in_flight, old, new = asyncio.run(go(engine.run_exclusive))
    assert in_flight == 0 and new == old + 1  # the running request had finished first
    in_flight, old, new = asyncio.run(go(engine.run_between_steps))
    assert in_flight == 1 and new == old + 1  # it ran while the request was still decoding


def test_a_request_rendered_on_changed_state_is_handed_back_unrun(
    engine: TransformersEngine,
) -> None:
    prompt = prompts(engine)[0]

    async def go() -> tuple[bool, bool, list[int]]:
        stale, fresh = OutputStream(), OutputStream()
        gone = engine.submit(prompt, greedy(4), stale, still_valid=lambda: False)
        kept = engine.submit(prompt, greedy(4), fresh, still_valid=lambda: True)
        await stale.admitted()
        return gone.stale, kept.stale, (await fresh.results())[0].token_ids

    gone, kept, tokens = asyncio.run(go())
    assert gone and not kept and len(tokens) == 4
