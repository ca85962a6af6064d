"""A stand-in edit method for machinery tests: 'shift' writes a seeded rank-one delta.

Tests of validation, ledger, journal, versions, undo, replay, auth and faults need a method whose
delta is known and instant, not a method's quality.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
import torch
from fastapi.testclient import TestClient

from editserve.edits import methods as edit_methods
from methods.base import EditContext, EditRequest, ParamDelta
from methods.spec import MethodSpec


@dataclass
class ShiftHparams:
    layer: int = 1
    scale: float = 2.0


def load_shift(model_type: str, num_layers: int, overrides: dict | None) -> ShiftHparams:
    overrides = overrides or {}
    unknown = set(overrides) - {"layer", "scale"}
    if unknown:
        raise ValueError(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}")
    if not isinstance(overrides.get("layer", 1), int):
        raise ValueError("layer must be an integer")
    return ShiftHparams(**overrides)


def compute_shift(ctx: EditContext, requests: list[EditRequest], h: ShiftHparams) -> ParamDelta:
    name = ctx.arch.down_proj_name(h.layer)
    weight = dict(ctx.model.named_parameters())[name]
    g = torch.Generator().manual_seed(sum(map(ord, requests[0].target_new)))
    u = torch.randn(weight.shape[0], 1, generator=g) * h.scale
    v = torch.randn(1, weight.shape[1], generator=g)
    return ParamDelta(low_rank={name: (u, v)})


def install_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = MethodSpec(
        "shift",
        frozenset({"insert", "modify", "erase"}),
        3,
        load_shift,
        compute_shift,
        "test stand-in",
        scopes=frozenset({"global", "question"}),
    )
    monkeypatch.setitem(edit_methods.METHODS, "shift", spec)


def weights_hash(client: TestClient) -> str:
    h = hashlib.sha256()
    for name, p in sorted(client.app.state.editserve.engine.model.state_dict().items()):
        h.update(name.encode() + p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
