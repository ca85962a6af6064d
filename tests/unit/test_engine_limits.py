"""The engine's bounds: a KV-cache budget (admission by worst case), a bounded waiting queue, and
a drain timeout after which a weight change preempts the running batch (issue 34, defects 2, 10)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from editserve.engine.limits import QueueFull, RequestTooLarge
from editserve.engine.request import GenerationChunk, OutputStream
from editserve.engine.sampling import SamplingParams
from editserve.engine.transformers_engine import TransformersEngine
from tests.conftest import tiny_model


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def make_engine(kind: str = "llama", max_len: int = 512, **kw: object) -> TransformersEngine:
    return TransformersEngine(tiny_model(kind, max_len=max_len), max_batch=8, **kw)


def run_all(engine: TransformersEngine, jobs: list[tuple[list[int], SamplingParams]]) -> list:
    async def go() -> list[list[int]]:
        streams = []
        for prompt, params in jobs:
            stream = OutputStream()
            engine.submit_group([(prompt, params)], stream)
            streams.append(stream)
        return [(await s.results())[0].token_ids for s in streams]

    return asyncio.run(go())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_kv_cache_never_exceeds_its_budget_and_answers_stay_exact(kind: str) -> None:
    """One long request among short ones: every slot used to grow to the long one's length."""
    probe = make_engine(kind)
    per_token = probe.kv_bytes_per_token
    engine = make_engine(kind, kv_cache_bytes=700 * per_token)
    assert engine.limits.kv_budget_tokens == 700
    prompt = engine.tokenizer.encode("Once upon a time")
    jobs = [(prompt, greedy(300))] + [(prompt[: 2 + i], greedy(20 + i)) for i in range(6)]
    probe.start()
    try:
        alone = [run_all(probe, [job])[0] for job in jobs]
    finally:
        probe.stop()

    cache = engine._cache
    peaks: list[tuple[int, int, int]] = []
    reshape = cache._ensure_room

    def watched(rows: int, columns: int, keep: int) -> None:  # a spy on the real cache
        reshape(rows, columns, keep)
        peaks.append((cache.allocated_bytes(), cache.rows, cache.capacity))

    cache._ensure_room = watched  # type: ignore[method-assign]
    batch_sizes: list[int] = []
    engine._on_step = lambda running, waiting: batch_sizes.append(running)
    engine.start()
    try:
        together = run_all(engine, jobs)
    finally:
        engine.stop()
    assert together == alone  # reallocation keeps every row's keys and values
    assert [len(t) for t in together] == [300] + [20 + i for i in range(6)]
    assert max(b for b, _, _ in peaks) <= engine.kv_cache_bytes
    assert all(rows * capacity <= 700 for _, rows, capacity in peaks)
    assert max(c for _, _, c in peaks) >= 300  # the long request did get its columns
    assert max(batch_sizes) > 1  # the short ones ran beside it, within the budget


def test_a_request_waits_until_its_worst_case_fits() -> None:
    """Two requests of 155 tokens each under a 200-token budget run one after the other."""
    engine = make_engine(kv_cache_bytes=200 * make_engine().kv_bytes_per_token)
    prompt = engine.tokenizer.encode("Hello")
    batch_sizes: list[int] = []
    engine._on_step = lambda running, waiting: batch_sizes.append(running)
    engine.start()
    try:
        first, second = run_all(engine, [(prompt, greedy(150)), (prompt, greedy(150))])
    finally:
        engine.stop()
    assert len(first) == len(second) == 150
    assert first == second
    assert max(batch_sizes) == 1  # the second waited in the queue; it was not refused


def test_a_request_that_could_never_fit_is_refused_at_submission() -> None:
    engine = make_engine(kv_cache_bytes=300 * make_engine().kv_bytes_per_token)
    reason = engine.check_length(10, 400)
    assert reason is not None and "EDITSERVE_KV_CACHE_MB" in reason and "300" in reason
    assert engine.check_length(10, 200) is None

    async def go() -> None:
        stream = OutputStream()
        prompt = engine.tokenizer.encode("Hello")
        with pytest.raises(RequestTooLarge, match="KV-cache budget"):
            engine.submit_group([(prompt, greedy(200))] * 2, stream)  # 2 x 205 > 300
        assert stream.handles == []

    asyncio.run(go())


def test_max_tokens_defaults_to_a_cap_and_has_a_limit() -> None:
    engine = make_engine(max_len=512, default_max_tokens=100, max_tokens_limit=200)
    assert engine.completion_budget(10, None) == 100
    assert engine.completion_budget(450, None) == 62  # what the context leaves, if less
    assert engine.completion_budget(10, 150) == 150
    reason = engine.check_length(10, 201)
    assert reason is not None and "200" in reason and "EDITSERVE_MAX_TOKENS_LIMIT" in reason


def test_the_waiting_queue_is_bounded() -> None:
    engine = make_engine(max_waiting=3)  # not started: nothing leaves the queue

    async def go() -> None:
        prompt = engine.tokenizer.encode("Hi")
        engine.submit_group([(prompt, greedy(2))] * 2, OutputStream())
        refused = OutputStream()
        with pytest.raises(QueueFull, match="EDITSERVE_MAX_WAITING") as raised:
            engine.submit_group([(prompt, greedy(2))] * 2, refused)  # 2 + 2 > 3
        assert raised.value.retry_after_s >= 1
        assert refused.handles == []  # nothing of the refused call was queued
        engine.submit_group([(prompt, greedy(2))], OutputStream())  # 3 fit
        assert engine.num_waiting == 3
        # A stale request rendered again keeps its place: never refused.
        engine.submit_group([(prompt, greedy(2))], OutputStream(), first=True)
        assert engine.num_waiting == 4

    asyncio.run(go())


def test_an_empty_queue_takes_a_call_larger_than_the_limit() -> None:
    engine = make_engine(max_waiting=1)

    async def go() -> None:
        prompt = engine.tokenizer.encode("Hi")
        engine.submit_group([(prompt, greedy(2))] * 3, OutputStream())  # would wait forever
        assert engine.num_waiting == 3

    asyncio.run(go())


def test_a_pending_weight_change_preempts_the_batch_after_the_drain_timeout() -> None:
    """A long request with ignore_eos: the change runs within timeout + a step; the request
    resumes on the new weights, keeps every token it streamed, finishes with its full token
    count and reports the new version."""
    timeout, total = 0.05, 400  # 400 decode steps take longer than 5 steps + the timeout
    engine = make_engine(max_len=512, drain_timeout_s=timeout)
    prompt = engine.tokenizer.encode("Once upon a time")
    engine.start()
    try:
        before = run_all(engine, [(prompt, greedy(total))])[0]

        async def go() -> tuple[list[GenerationChunk], float, tuple[int, int]]:
            stream = OutputStream()
            handle = engine.submit_group([(prompt, greedy(total))], stream)[0]
            chunks: list[GenerationChunk] = []
            async for _, chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 5:
                    break

            def change() -> tuple[int, int]:
                with torch.no_grad():
                    engine.model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
                engine.model_version += 1
                return engine.num_running, engine.num_waiting

            asked = time.monotonic()
            future = asyncio.wrap_future(engine.run_exclusive(change))
            in_flight = await future
            waited = time.monotonic() - asked
            async for _, chunk in stream:
                chunks.append(chunk)
            assert handle.model_version == 1 and handle.preemptions == 1
            return chunks, waited, in_flight

        chunks, waited, in_flight = asyncio.run(go())
        assert in_flight == (0, 1)  # it ran with the request preempted, not finished
        assert timeout <= waited < timeout + 1.0
        tokens = [t for c in chunks for t in c.token_ids]
        assert len(tokens) == total and chunks[-1].finish_reason == "length"
        versions = [c.model_version for c in chunks]
        k = versions.count(0)
        assert 5 <= k < total and versions == [0] * k + [1] * (total - k)
        assert tokens[:k] == before[:k]  # what was streamed stays as sent
        # The rest is the new weights' greedy continuation of the prompt and those tokens.
        resumed = run_all(engine, [(prompt + tokens[:k], greedy(total - k))])[0]
        assert tokens[k:] == resumed
        assert tokens != before
    finally:
        engine.stop()


def test_a_weight_change_waits_for_a_batch_that_drains_in_time() -> None:
    engine = make_engine(drain_timeout_s=30.0)
    prompt = engine.tokenizer.encode("Hello")
    engine.start()
    try:

        async def go() -> tuple[int, int]:
            stream = OutputStream()
            handle = engine.submit_group([(prompt, greedy(40))], stream)[0]
            async for _ in stream:
                break
            in_flight = await asyncio.wrap_future(engine.run_exclusive(lambda: engine.num_running))
            await stream.results()
            return in_flight, handle.preemptions

        assert asyncio.run(go()) == (0, 0)
    finally:
        engine.stop()
