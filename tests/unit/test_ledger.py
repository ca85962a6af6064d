"""The weight ledger: exact undo in any order, recomposition in float32, refusals."""

from __future__ import annotations

import hashlib

import pytest
import torch

from editserve.edits.ledger import DeltaRejected, WeightLedger
from methods.base import ParamDelta
from tests.conftest import tiny_model

NAME = "model.layers.1.mlp.down_proj.weight"
OTHER = "model.layers.0.mlp.down_proj.weight"


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
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
def test_applying_adds_to_the_sum_with_the_bits_of_a_recomposition(dtype: torch.dtype) -> None:
    # Apply adds one delta to a kept float32 sum; the weight must be exactly what summing
    # pristine and every active delta in order gives, also after an undo rebuilt that sum.
    model = tiny_model("llama").model.to(dtype)
    param = dict(model.named_parameters())[NAME]
    pristine = param.detach().clone()
    ledger = WeightLedger(model)
    ds = deltas(model)
    extra = ParamDelta(low_rank={NAME: rank_one(tuple(param.shape), 4)})
    for i, delta in enumerate(ds):
        ledger.apply(f"e{i}", delta)
    ledger.revert("e1")
    ledger.apply("e3", extra)
    expected = pristine.to(torch.float32)
    for delta in (ds[0], ds[2], extra):
        expected = expected + delta.matrix(NAME)
    assert torch.equal(param, expected.to(dtype))


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
