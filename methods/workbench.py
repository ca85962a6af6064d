"""A workbench: the live model's module tree, copied, sharing every weight tensor.

Editing methods register hooks (to read keys, to add a trial vector) and run their own forward
passes while the engine keeps serving. Hooks live on module objects, so methods get their own
module objects; the weights are the very same tensors, so a workbench always sees the model
exactly as served, edits included, and costs no weight memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from methods.base import ParamDelta


def make_workbench(model: nn.Module) -> nn.Module:
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    bench = copy.deepcopy(model, memo=dict(shared))
    for (name, live), (_, copied) in zip(
        model.named_parameters(), bench.named_parameters(), strict=True
    ):
        assert live is copied, f"workbench parameter {name} is a copy, not the live tensor"
    return bench


@contextmanager
def added_delta(model: nn.Module, delta: ParamDelta) -> Iterator[None]:
    """Makes `model` (a workbench) compute as if `delta` were added to its weights.

    A forward hook on each touched module adds x ΔWᵀ (x ΔW for GPT-2's Conv1D, which stores
    [in, out]) to its output; the weights are never touched, so serving is unaffected.
    """
    handles = []
    for name in delta.names():
        module_name, _, param = name.rpartition(".")
        assert param == "weight", f"only weight matrices can carry a delta, not {name}"
        module = model.get_submodule(module_name)
        hook = _adding_hook(delta.matrix(name), linear=isinstance(module, nn.Linear))
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adding_hook(delta: torch.Tensor, linear: bool):  # noqa: ANN202 (a torch hook)
    """nn.Linear stores [out, in]: add x ΔWᵀ. GPT-2's Conv1D stores [in, out]: add x ΔW."""

    def hook(_: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        d = delta.to(x.dtype)
        return output + (x @ d.T if linear else x @ d)

    return hook
