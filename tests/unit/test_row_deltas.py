"""Scoped deltas added per batch row (issue 36): rows with a delta compute as the model with it
merged into the weights, rows without stay bit-identical to the unedited model, and a request
keeps the deltas it was submitted with, whatever happens to them afterwards."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from editserve.edits.scoped import row_delta_from
from editserve.engine.request import OutputStream
from editserve.engine.row_deltas import RowDelta, RowDeltaHooks
from editserve.engine.sampling import SamplingParams
from editserve.engine.transformers_engine import TransformersEngine
from methods.architectures import resolve
from methods.base import ParamDelta
from tests.conftest import tiny_model

KINDS = ["llama", "gpt2"]
STEPS = 20
TEXTS = ["Hello", "The capital of France is", "a", "Once upon a time, far away, there", "Hi"]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def random_delta(model: nn.Module, layers: list[int], seed: int) -> ParamDelta:
    """A rank-2 ΔW = U @ V at each layer's down-projection, in the parameter's own layout, big
    enough to change greedy answers."""
    arch = resolve(model)
    generator = torch.Generator().manual_seed(seed)
    delta = ParamDelta()
    for layer in layers:
        name = arch.down_proj_name(layer)
        rows, columns = model.get_parameter(name).shape
        u = torch.randn(rows, 2, generator=generator) * 0.3
        v = torch.randn(2, columns, generator=generator) * 0.3
        delta.low_rank[name] = (u, v)
    return delta


def to_rows(engine: TransformersEngine, delta: ParamDelta, label: str) -> RowDelta:
    weight = next(engine.model.parameters())
    transposed = resolve(engine.model).spec.weight_is_transposed
    return row_delta_from(delta, transposed, dtype=weight.dtype, device=weight.device, label=label)


def merged(kind: str, deltas: list[ParamDelta]) -> nn.Module:
    """The same tiny model (same seed), with `deltas` added to its weights."""
    model = tiny_model(kind).model
    with torch.no_grad():
        for delta in deltas:
            for name in delta.names():
                model.get_parameter(name).add_(delta.matrix(name))
    return model


def run_group(
    engine: TransformersEngine, prompts: list[list[int]], per_row: list[tuple[RowDelta, ...]]
) -> tuple[list[list[int]], torch.Tensor]:
    """Runs the prompts as one group (admitted together, rows in this order): each row's greedy
    tokens, and its logits at every step [rows, STEPS, vocab], read at the LM head."""
    calls: list[torch.Tensor] = []
    head = engine.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, _i, out: calls.append(out.detach().clone()))

    async def go() -> list[list[int]]:
        stream = OutputStream()
        engine.submit_group([(p, greedy(STEPS)) for p in prompts], stream, row_deltas=per_row)
        return [r.token_ids for r in await stream.results()]

    try:
        tokens = asyncio.run(go())
    finally:
        hook.remove()
    rows = len(prompts)
    assert len(calls) == rows + STEPS - 1
    first = torch.cat(calls[:rows][::-1])  # the prefill reads each row alone, the last first
    return tokens, torch.stack([first, *calls[rows:]], dim=1)


def generate(
    engine: TransformersEngine, prompt: list[int], n: int, deltas: tuple[RowDelta, ...] = ()
) -> list[int]:
    async def go() -> list[int]:
        stream = OutputStream()
        engine.submit(prompt, greedy(n), stream, row_deltas=deltas)
        return (await stream.results())[0].token_ids

    return asyncio.run(go())


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def engine(kind: str):
    eng = TransformersEngine(tiny_model(kind), max_batch=8, drain_timeout_s=0.0)
    eng.start()
    yield eng
    eng.stop()


def test_a_mixed_batch_gives_each_row_its_own_deltas(kind: str, engine: TransformersEngine) -> None:
    delta_a = random_delta(engine.model, [0], seed=1)
    delta_b = random_delta(engine.model, [0, 1], seed=2)  # shares layer 0's module with A
    a, b = to_rows(engine, delta_a, "A"), to_rows(engine, delta_b, "B")
    prompts = [engine.tokenizer.encode(t) for t in TEXTS]
    scopes: list[tuple[RowDelta, ...]] = [(), (a,), (b,), (a, b), ()]
    tokens, logits = run_group(engine, prompts, scopes)
    plain_tokens, plain_logits = run_group(engine, prompts, [()] * len(prompts))

    for row in (0, 4):  # no delta: bit for bit the unedited model's
        assert torch.equal(logits[row], plain_logits[row])
        assert tokens[row] == plain_tokens[row]
    references = {1: [delta_a], 2: [delta_b], 3: [delta_a, delta_b]}
    for row, deltas in references.items():
        model = merged(kind, deltas)
        ids = prompts[row] + tokens[row]
        with torch.no_grad():
            full = model(torch.tensor([ids])).logits[0]
        start = len(prompts[row]) - 1
        torch.testing.assert_close(logits[row], full[start : start + STEPS], atol=1e-4, rtol=1e-4)
        assert tokens[row] == [int(t) for t in full[start : start + STEPS].argmax(-1)]
        assert tokens[row] != plain_tokens[row]  # the delta matters


def test_registered_deltas_leave_rows_out_of_scope_bit_identical(
    engine: TransformersEngine,
) -> None:
    prompts = [engine.tokenizer.encode(t) for t in TEXTS]
    plain_tokens, plain_logits = run_group(engine, prompts, [()] * len(prompts))
    deltas = [
        to_rows(engine, random_delta(engine.model, [i % 2], seed=i), f"d{i}") for i in range(5)
    ]
    for delta in deltas:
        engine.register_row_delta(delta).result()
    assert len(engine._row_deltas.hooked) == 2  # one hook per module, however many deltas
    tokens, logits = run_group(engine, prompts, [()] * len(prompts))
    assert tokens == plain_tokens and torch.equal(logits, plain_logits)
    for delta in deltas:
        engine.unregister_row_delta(delta).result()
    wait_until(lambda: engine._row_deltas.hooked == [])


def test_a_request_keeps_its_delta_after_it_is_removed(engine: TransformersEngine) -> None:
    """Removed mid-generation, the delta stays with the request that carries it; a request
    submitted afterwards runs in the same batch without it."""
    prompt = engine.tokenizer.encode("Once upon a time")
    long, short = 200, 15  # the first is far from done when the second joins
    delta = to_rows(engine, random_delta(engine.model, [1], seed=3), "A")
    expected_with = generate(engine, prompt, long, (delta,))
    expected_without = generate(engine, prompt, short)
    assert expected_with[:short] != expected_without

    async def go(registry: list[RowDelta]) -> tuple[list[int], list[int], int]:
        await asyncio.wrap_future(engine.register_row_delta(registry[0]))
        first = OutputStream()
        engine.submit(prompt, greedy(long), first, row_deltas=(registry[0],))
        tokens: list[int] = []
        async for _, chunk in first:
            tokens += chunk.token_ids
            if len(tokens) == 5:
                break
        await asyncio.wrap_future(engine.unregister_row_delta(registry.pop()))
        second = OutputStream()
        engine.submit(prompt, greedy(short), second)
        in_flight = engine.num_running + engine.num_waiting
        later = asyncio.ensure_future(second.results())
        async for _, chunk in first:
            tokens += chunk.token_ids
        return tokens, (await later)[0].token_ids, in_flight

    with_delta, without, in_flight = asyncio.run(go([delta]))
    assert in_flight == 2
    assert with_delta == expected_with
    assert without == expected_without
    wait_until(lambda: engine._row_deltas.hooked == [])  # idle: nothing live, nothing hooked


def test_a_preempted_request_resumes_with_its_delta(engine: TransformersEngine) -> None:
    """A weight change preempts it (drain timeout 0): it resumes, its KV cache rebuilt, with
    its delta."""
    prompt = engine.tokenizer.encode("Once upon a time")
    delta = to_rows(engine, random_delta(engine.model, [0, 1], seed=4), "A")
    total = 60
    expected = generate(engine, prompt, total, (delta,))

    async def go() -> tuple[list[int], list[int], int]:
        stream = OutputStream()
        handle = engine.submit(prompt, greedy(total), stream, row_deltas=(delta,))
        tokens: list[int] = []
        versions: list[int] = []
        async for _, chunk in stream:
            tokens += chunk.token_ids
            versions.append(chunk.model_version)
            if len(tokens) == 5:
                change = engine.run_exclusive(lambda: setattr(engine, "model_version", 1))
                await asyncio.wrap_future(change)
        return tokens, versions, handle.preemptions

    tokens, versions, preemptions = asyncio.run(go())
    assert preemptions == 1 and len(tokens) == total
    k = versions.count(0)
    assert 5 <= k < total and versions == [0] * k + [1] * (total - k)
    assert tokens[:k] == expected[:k]
    assert tokens[k:] == generate(engine, prompt + tokens[:k], total - k, (delta,))
    assert tokens[k:] != generate(engine, prompt + tokens[:k], total - k)


def test_a_delta_that_does_not_fit_is_refused_at_submission(engine: TransformersEngine) -> None:
    good = to_rows(engine, random_delta(engine.model, [0], seed=5), "A")
    ((name, (down, up)),) = good.factors.items()
    misfits = [
        RowDelta({name: (up.T.contiguous()[:, :1], down.T.contiguous()[:1])}, "swapped"),
        RowDelta({"lm_head": (down, up)}, "outside the decoder"),
        RowDelta({name: (down.double(), up.double())}, "float64"),
    ]
    prompt = engine.tokenizer.encode("Hi")

    async def submit(delta: RowDelta) -> None:
        engine.submit(prompt, greedy(2), OutputStream(), row_deltas=(delta,))

    for misfit in misfits:
        with pytest.raises(ValueError, match=misfit.label):
            asyncio.run(submit(misfit))
    with pytest.raises(ValueError, match="factors must be"):
        RowDelta({name: (down, up.T)}, "ranks differ")


def test_hooks_add_nothing_to_a_forward_on_another_thread() -> None:
    """A workbench shares the live modules' hooks; its forwards run off the engine thread."""
    model = tiny_model("llama").model
    hooks = RowDeltaHooks(model, model.base_model)
    delta = row_delta_from(
        random_delta(model, [0], seed=6), False, dtype=torch.float32, device="cpu"
    )
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        plain = model(ids).logits
        with hooks.for_rows([(delta,)]):
            here = model(ids).logits
            elsewhere: list[torch.Tensor] = []
            thread = threading.Thread(target=lambda: elsewhere.append(model(ids).logits))
            thread.start()
            thread.join()
    assert not torch.equal(here, plain)
    assert torch.equal(elsewhere[0], plain)


def test_a_module_stays_hooked_while_a_registered_or_running_delta_touches_it() -> None:
    model = tiny_model("llama").model
    hooks = RowDeltaHooks(model, model.base_model)

    def convert(layers: list[int], seed: int) -> RowDelta:
        delta = random_delta(model, layers, seed)
        return row_delta_from(delta, False, dtype=torch.float32, device="cpu")

    first, second = convert([0], 7), convert([0, 1], 8)
    layer = "model.layers.{}.mlp.down_proj".format
    for delta in (first, second, second):  # registering twice counts once
        hooks.register(delta)
    assert hooks.hooked == [layer(0), layer(1)]
    hooks.unregister(second)
    hooks.prune([(second,)])  # a running request still carries it
    assert hooks.hooked == [layer(0), layer(1)]
    hooks.prune()
    assert hooks.hooked == [layer(0)]
    hooks.unregister(first)
    hooks.unregister(first)
    hooks.prune()
    assert hooks.hooked == []
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("transposed", [False, True])
def test_the_converter_reads_the_weight_layout(transposed: bool) -> None:
    """nn.Linear stores [out, in] and computes x Wᵀ; GPT-2's Conv1D stores [in, out], x W."""
    d_in, d_out = 12, 7
    layer: nn.Module = Conv1D(d_out, d_in) if transposed else nn.Linear(d_in, d_out)
    shape = layer.weight.shape
    u, v = torch.randn(shape[0], 3), torch.randn(3, shape[1])
    delta = ParamDelta(low_rank={"block.proj.weight": (u, v)})
    row = row_delta_from(delta, transposed, dtype=torch.float32, device="cpu")
    down, up = row.factors["block.proj"]
    assert down.shape == (d_in, 3) and up.shape == (3, d_out)
    x = torch.randn(5, d_in)
    change = u @ v
    torch.testing.assert_close((x @ down) @ up, x @ change if transposed else x @ change.T)
    with torch.no_grad():
        before = layer(x)
        layer.weight.add_(change)
        torch.testing.assert_close(before + (x @ down) @ up, layer(x))


def test_the_converter_refuses_dense_deltas() -> None:
    dense = ParamDelta(dense={"model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="dense.*FT-M"):
        row_delta_from(dense, False, dtype=torch.float32, device="cpu")
    bias = ParamDelta(low_rank={"m.bias": (torch.zeros(4, 1), torch.zeros(1, 4))})
    with pytest.raises(ValueError, match="only weight matrices"):
        row_delta_from(bias, False, dtype=torch.float32, device="cpu")


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
