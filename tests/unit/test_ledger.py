"""The weight ledger: exact undo in any order, host copies freed with the last edit, refusals."""

from __future__ import annotations

import hashlib

import pytest
import torch

from editserve.edits.ledger import CHUNK, DeltaRejected, WeightLedger
from methods.base import ParamDelta
from tests.conftest import tiny_model

NAME = "model.layers.1.mlp.down_proj.weight"
OTHER = "model.layers.0.mlp.down_proj.weight"


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().flatten().view(torch.uint8).numpy().tobytes())  # bf16 too
    return h.hexdigest()


def rank_one(shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], 1, generator=g), torch.randn(1, shape[1], generator=g)


def deltas(model: torch.nn.Module) -> list[ParamDelta]:
    shape = tuple(dict(model.named_parameters())[NAME].shape)
    return [
        ParamDelta(low_rank={NAME: rank_one(shape, 1)}),
        ParamDelta(dense={NAME: torch.randn(shape) * 0.01, OTHER: torch.randn(shape) * 0.01}),
        ParamDelta(low_rank={NAME: rank_one(shape, 3)}),
    ]


def test_undoing_every_edit_in_any_order_is_bit_identical() -> None:
    model = tiny_model("llama").model
    original = weights_hash(model)
    ledger = WeightLedger(model)
    for i, delta in enumerate(deltas(model)):
        ledger.apply(f"e{i}", delta)
    assert weights_hash(model) != original
    for edit_id in ("e1", "e0", "e2"):
        ledger.revert(edit_id)
    assert weights_hash(model) == original


def test_undoing_the_middle_edit_equals_applying_the_other_two() -> None:
    a, b = tiny_model("llama").model, tiny_model("llama").model
    da, db = deltas(a), deltas(b)
    ledger_a, ledger_b = WeightLedger(a), WeightLedger(b)
    for i, delta in enumerate(da):
        ledger_a.apply(f"e{i}", delta)
    ledger_a.revert("e1")
    ledger_b.apply("e0", db[0])
    ledger_b.apply("e2", db[2])
    assert weights_hash(a) == weights_hash(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weight_depends_only_on_the_active_deltas(dtype: torch.dtype) -> None:
    # Apply and undo compose the same way, so a history with an undo in it gives the bits of
    # applying what is left to a fresh model; and that is pristine + the deltas, in float32.
    a, b = tiny_model("llama").model.to(dtype), tiny_model("llama").model.to(dtype)
    param = dict(a.named_parameters())[NAME]
    pristine = param.detach().clone()
    ledger_a, ledger_b = WeightLedger(a), WeightLedger(b)
    ds = deltas(a)
    extra = ParamDelta(low_rank={NAME: rank_one(tuple(param.shape), 4)})
    for i, delta in enumerate(ds):
        ledger_a.apply(f"e{i}", delta)
    ledger_a.revert("e1")
    ledger_a.apply("e3", extra)
    for edit_id, delta in (("e0", ds[0]), ("e2", ds[2]), ("e3", extra)):
        ledger_b.apply(edit_id, delta)
    assert weights_hash(a) == weights_hash(b)
    expected = pristine.to(torch.float32)
    for delta in (ds[0], ds[2], extra):
        expected = expected + delta.matrix(NAME)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(param.float(), expected.to(dtype).float(), rtol=tolerance, atol=tolerance)


def test_weights_change_in_place() -> None:
    model = tiny_model("llama").model
    param = dict(model.named_parameters())[NAME]
    pointer = param.data_ptr()
    ledger = WeightLedger(model)
    ledger.apply("e0", deltas(model)[0])
    assert dict(model.named_parameters())[NAME] is param and param.data_ptr() == pointer
    u, v = deltas(model)[0].low_rank[NAME]
    assert torch.allclose(param, ledger._pristine[NAME] + u @ v)


def test_bad_deltas_are_refused_before_anything_changes() -> None:
    model = tiny_model("llama").model
    original = weights_hash(model)
    ledger = WeightLedger(model)
    shape = tuple(dict(model.named_parameters())[NAME].shape)
    bad = [
        ParamDelta(),
        ParamDelta(dense={"model.nothing.weight": torch.zeros(2, 2)}),
        ParamDelta(dense={NAME: torch.zeros(3, 3)}),
        ParamDelta(dense={NAME: torch.full(shape, float("nan"))}),
    ]
    for delta in bad:
        with pytest.raises(DeltaRejected):
            ledger.apply("bad", delta)
    assert weights_hash(model) == original and ledger.active_ids == []


def test_param_delta_round_trips_through_tensors() -> None:
    model = tiny_model("llama").model
    delta = deltas(model)[1]
    delta.low_rank[NAME] = rank_one(tuple(delta.dense[NAME].shape), 9)
    back = ParamDelta.from_tensors(delta.to_tensors())
    for name in delta.names():
        assert torch.equal(back.matrix(name), delta.matrix(name))


def held_copies(ledger: WeightLedger) -> list[torch.Tensor]:
    """Every tensor the ledger keeps of its own: not the live weights, not the deltas."""
    found, stack = [], [v for k, v in vars(ledger).items() if k not in ("_params", "_active")]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def many_deltas(model: torch.nn.Module, n: int) -> list[ParamDelta]:
    """n deltas on NAME, rank one but every tenth dense, so chunks mix both kinds."""
    shape = tuple(dict(model.named_parameters())[NAME].shape)
    g = torch.Generator().manual_seed(7)
    return [
        ParamDelta(dense={NAME: torch.randn(shape, generator=g) * 0.01})
        if i % 10 == 9
        else ParamDelta(low_rank={NAME: rank_one(shape, 100 + i)})
        for i in range(n)
    ]


def test_undo_anywhere_past_several_chunks_equals_applying_the_rest() -> None:
    # Past CHUNK deltas the ledger keeps a checkpoint; undoing before it, inside the last chunk,
    # the first or the newest must each give the bits of a fresh ledger given what is left.
    model = tiny_model("llama").model
    ds = many_deltas(model, 2 * CHUNK + 20)
    ledger = WeightLedger(model)
    active = {f"e{i}": d for i, d in enumerate(ds)}
    for edit_id, delta in active.items():
        ledger.apply(edit_id, delta)
    for undone in (f"e{2 * CHUNK + 10}", f"e{CHUNK // 2}", "e0", f"e{len(ds) - 1}"):
        ledger.revert(undone)
        del active[undone]
        fresh = tiny_model("llama").model
        replay = WeightLedger(fresh)
        for edit_id, delta in active.items():
            replay.apply(edit_id, delta)
        assert weights_hash(model) == weights_hash(fresh), f"after undoing {undone}"
    extra = many_deltas(model, 1)[0]
    ledger.apply("late", extra)
    replay.apply("late", extra)
    assert weights_hash(model) == weights_hash(fresh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_undoing_everything_in_any_order_frees_the_copies(dtype: torch.dtype) -> None:
    model = tiny_model("llama").model.to(dtype)
    original = weights_hash(model)
    ledger = WeightLedger(model)
    ds = [*deltas(model), *many_deltas(model, CHUNK + 5)]
    for i, delta in enumerate(ds):
        ledger.apply(f"e{i}", delta)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3)).tolist()
    for i in order:
        ledger.revert(f"e{i}")
    assert weights_hash(model) == original
    assert ledger._pristine == {} and ledger.tracked() == [] and ledger.held_bytes() == 0


def test_a_matrix_is_freed_when_its_last_edit_is_undone() -> None:
    model = tiny_model("llama").model
    params = dict(model.named_parameters())
    other_before = params[OTHER].detach().clone()
    ledger = WeightLedger(model)
    ds = deltas(model)  # e1 is the only one that touches OTHER
    for i, delta in enumerate(ds):
        ledger.apply(f"e{i}", delta)
    assert torch.equal(ledger._pristine[OTHER], other_before)
    ledger.revert("e1")
    assert list(ledger._pristine) == [NAME] and ledger.tracked() == [NAME]
    assert torch.equal(params[OTHER], other_before) and ledger.pristine(OTHER) is None
    ledger.revert("e0")
    assert ledger.tracked() == [NAME]
    ledger.revert("e2")
    assert ledger.tracked() == []


def test_pristine_copies_are_host_tensors_of_their_own_and_no_float32_sum_is_kept() -> None:
    model = tiny_model("llama").model.to(torch.bfloat16)
    param = dict(model.named_parameters())[NAME]
    before = param.detach().clone()
    ledger = WeightLedger(model)
    ledger.apply("e0", deltas(model)[0])
    copy = ledger._pristine[NAME]
    assert copy.device.type == "cpu" and copy.dtype == torch.bfloat16
    assert copy.untyped_storage().data_ptr() != param.untyped_storage().data_ptr()
    assert torch.equal(copy, before) and not torch.equal(param, before)
    # Under CHUNK deltas the pristine copy is all it holds: no float32 sum, on any device.
    assert [t.dtype for t in held_copies(ledger)] == [torch.bfloat16]
    assert ledger.held_bytes() == param.numel() * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_copies_stay_in_host_memory_and_undo_is_exact() -> None:
    model = tiny_model("llama").model.to("cuda", torch.bfloat16)
    original = weights_hash(model.cpu())
    model.to("cuda")
    ledger = WeightLedger(model)
    ds = [*deltas(model), *many_deltas(model, CHUNK + 5)]
    for i, delta in enumerate(ds):
        ledger.apply(f"e{i}", delta)
    held = held_copies(ledger)
    assert len(held) == 3 and all(t.device.type == "cpu" for t in held)  # 2 copies, 1 checkpoint
    assert dict(model.named_parameters())[NAME].device.type == "cuda"
    for i in reversed(range(len(ds))):
        ledger.revert(f"e{i}")
    assert weights_hash(model.cpu()) == original and ledger.tracked() == []


def test_bad_low_rank_factors_are_refused_without_forming_the_product() -> None:
    model = tiny_model("llama").model
    original = weights_hash(model)
    out, inner = tuple(dict(model.named_parameters())[NAME].shape)
    ledger = WeightLedger(model)
    nan = torch.randn(1, inner)
    nan[0, 3] = float("nan")
    bad = [
        (torch.randn(out, 2), torch.randn(1, inner)),  # do not multiply
        (torch.randn(out), torch.randn(1, inner)),  # not matrices
        (torch.randn(out, 1), torch.randn(1, inner + 1)),  # the wrong shape
        (torch.randn(out, 1), nan),
        (torch.full((out, 1), 1e30), torch.full((1, inner), 1e30)),  # a product that overflows
    ]
    for u, v in bad:
        with pytest.raises(DeltaRejected):
            ledger.apply("bad", ParamDelta(low_rank={NAME: (u, v)}))
    assert weights_hash(model) == original and ledger.tracked() == []
