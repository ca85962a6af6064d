"""A workbench: the live model's module tree, copied, sharing every weight tensor.

Editing methods register hooks (to read keys, to add a trial vector) and run their own forward
passes while the engine keeps serving. Hooks live on module objects, so methods get their own
module objects; the weights are the very same tensors, so a workbench always sees the model
exactly as served, edits included, and costs no weight memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from methods.architectures import WeightChange, WeightLayout, resolve
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
def hooks(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Keeps the hooks just registered (`handles`) for the block, and removes them however it
    ends: a method's hooks must never outlive its own step on the workbench."""
    held = list(handles)
    try:
        yield
    finally:
        for handle in held:
            handle.remove()


@contextmanager
def added_weights(
    model: nn.Module, layout: WeightLayout, changes: Mapping[str, WeightChange]
) -> Iterator[None]:
    """Makes `model` (a workbench) compute as if W + ΔW for each named weight, ΔW in the
    parameter's own layout (dense, or low-rank factors).

    A forward hook on each touched module adds `layout.output_change(x, ΔW)` to its output; the
    weights are never touched, so serving is unaffected.
    """
    handles = []
    for name, change in changes.items():
        module_name, _, param = name.rpartition(".")
        assert param == "weight", f"only weight matrices can carry a delta, not {name}"
        hook = _adding_hook(layout, change)
        handles.append(model.get_submodule(module_name).register_forward_hook(hook))
    with hooks(handles):
        yield


def added_delta(model: nn.Module, delta: ParamDelta) -> AbstractContextManager[None]:
    """`added_weights` for a method's whole result, each ΔW multiplied out (`delta.matrix`)."""
    changes = {name: delta.matrix(name) for name in delta.names()}
    return added_weights(model, resolve(model).layout, changes)


def _adding_hook(layout: WeightLayout, change: WeightChange):  # noqa: ANN202 (a torch hook)
    def hook(_: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + layout.output_change(inputs[0], change)

    return hook
