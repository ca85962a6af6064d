"""Weight deltas applied to some rows of the batch only, inside the batched forward.

A scoped edit reaches only the requests in its scope, while requests of every scope share one
decode step, as multi-adapter servers give each row its own LoRA (Punica, S-LoRA, LoRAX). Each
edit is a `RowDelta`: per module, low-rank factors in input/output space, so that the module's
output gains `(x @ down) @ up` on the rows that carry it and nothing anywhere else.

A request's deltas are chosen when it is submitted and never change (they are on its
`RequestHandle`): its KV cache is built with them, resumed after a preemption too, and removing
the edit from any registry leaves the request on the objects it holds.

`RowDeltaHooks` puts one forward hook on each module that some delta touches; before each
forward the engine says which deltas each row carries (`for_rows`), and the hooks read that.
Rows without a delta are left untouched, so they stay bit-identical to the unedited model; with
no delta in the batch every hook returns at once.

Thread model: only the thread that owns the model (the engine thread; once it has stopped, the
caller of `stop`) calls `for_rows`, `register`, `unregister` and `prune`, which add and remove
hooks on the live model; `check` only reads shapes and may run anywhere. A forward on another
thread (a workbench sharing these hooks) sees no assignment.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True, eq=False)  # compared and grouped by identity: one object per edit
class RowDelta:
    """One edit's per-row change: for each module name (`model.layers.5.mlp.down_proj`), factors
    `down` [in, r] and `up` [r, out] on the module's device and in its dtype; the module's
    output gains `(x @ down) @ up` whatever the layout its weight is stored in."""

    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    label: str = ""  # for messages: the edit it comes from

    def __post_init__(self) -> None:
        for name, (down, up) in self.factors.items():
            if down.dim() != 2 or up.dim() != 2 or down.shape[1] != up.shape[0]:
                raise ValueError(
                    f"row delta {self.label or '?'} at {name}: factors must be down [in, r] and "
                    f"up [r, out], not {tuple(down.shape)} and {tuple(up.shape)}"
                )


Assignment = Sequence[tuple[RowDelta, ...]]  # per batch row, the deltas it carries
# Per module: (rows, or None for every row of the batch; down; up), one entry per delta.
_Plan = dict[str, list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]]


class RowDeltaHooks:
    """The forward hooks that add row deltas to the live model's modules."""

    def __init__(self, model: nn.Module, decoder: nn.Module) -> None:
        # Only modules inside the decoder: the engine runs the LM head row by row at prefill, so
        # there a batch row is not dim 0.
        inside = {id(m) for m in decoder.modules()}
        self._modules = {n: m for n, m in model.named_modules() if id(m) in inside}
        self._device = next(model.parameters()).device
        self._hooks: dict[str, RemovableHandle] = {}
        self._registered: set[RowDelta] = set()  # the live deltas
        # How many registered deltas touch each module: kept as they come and go, so a decode
        # step never walks the registry (1,000 deltas must cost it nothing).
        self._registered_at: Counter[str] = Counter()
        self._plan: _Plan | None = None
        self._owner = 0  # the thread whose forward the plan is for

    # -- anywhere ---------------------------------------------------------------------------------

    def check(self, delta: RowDelta) -> None:
        """Raises ValueError unless every factor fits its module (widths, dtype, device): a
        misfit would fail inside a forward, and with it every request of the batch."""
        for name, (down, up) in delta.factors.items():
            module = self._modules.get(name)
            if module is None:
                raise ValueError(
                    f"row delta {delta.label or '?'}: the decoder has no module {name}"
                )
            widths = _widths(module)
            if widths is None:
                raise ValueError(f"row delta {delta.label or '?'}: {name} is not a linear layer")
            weight = module.weight
            fits = (down.shape[0], up.shape[1]) == widths
            if not fits or {down.dtype, up.dtype} != {weight.dtype}:
                raise ValueError(
                    f"row delta {delta.label or '?'} at {name}: factors {tuple(down.shape)} "
                    f"{down.dtype} and {tuple(up.shape)} {up.dtype} do not fit a layer of "
                    f"(in, out) = {widths} in {weight.dtype}"
                )
            if down.device != weight.device or up.device != weight.device:
                raise ValueError(
                    f"row delta {delta.label or '?'} at {name}: factors on {down.device}, "
                    f"the layer on {weight.device}"
                )

    # -- the engine thread ------------------------------------------------------------------------

    def register(self, delta: RowDelta) -> None:
        """Makes `delta` live: its modules are hooked until it is unregistered and no running
        request carries it (hooking is then done before any row needs it)."""
        self.check(delta)
        if delta not in self._registered:
            self._registered.add(delta)
            self._registered_at.update(delta.factors.keys())
        self._install(delta.factors)

    def unregister(self, delta: RowDelta) -> None:
        """Running requests that carry `delta` keep it; its hooks go once none does (`prune`)."""
        if delta in self._registered:
            self._registered.remove(delta)
            self._registered_at.subtract(delta.factors.keys())
            for name in [n for n in delta.factors if self._registered_at[n] <= 0]:
                del self._registered_at[name]

    def prune(self, held: Iterable[tuple[RowDelta, ...]] = ()) -> None:
        """Removes the hooks of modules that no registered delta and no delta in `held` (those
        of every request still running) touches."""
        unregistered = [n for n in self._hooks if n not in self._registered_at]
        if not unregistered:
            return
        used = {name for deltas in held for d in deltas for name in d.factors}
        for name in unregistered:
            if name not in used:
                self._hooks.pop(name).remove()

    @contextmanager
    def for_rows(self, assignment: Assignment, whole_batch: bool = False) -> Iterator[None]:
        """The next forward's batch row i carries `assignment[i]`. `whole_batch`: these are all
        the running requests, so hooks that none of them nor any registered delta needs go."""
        plan = _plan(assignment, self._device)
        if plan is not None:
            self._install(plan)
        if whole_batch:
            self.prune(assignment)
        self._plan, self._owner = plan, threading.get_ident()
        try:
            yield
        finally:
            self._plan = None

    @property
    def hooked(self) -> list[str]:
        """The module names that carry a hook now."""
        return sorted(self._hooks)

    # -- internals --------------------------------------------------------------------------------

    def _install(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self._hooks:
                self._hooks[name] = self._modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str):  # noqa: ANN202 (a torch hook)
        # A closure, not a bound method: deepcopy (a workbench) keeps functions as they are, and
        # a copied hook still reads this object, which gives it nothing off the engine thread.
        def add_row_deltas(
            _: nn.Module, inputs: tuple, output: torch.Tensor
        ) -> torch.Tensor | None:
            plan = self._plan
            if plan is None or self._owner != threading.get_ident():
                return None
            work = plan.get(name)
            if work is None:
                return None
            x = inputs[0]  # [B, T, in]; output [B, T, out]
            for rows, down, up in work:
                if rows is None:
                    output.add_((x @ down) @ up)
                else:  # one (k x in) @ (in x r) @ (r x out) product for the delta's k rows
                    output.index_add_(0, rows, (x[rows] @ down) @ up)
            return output

        return add_row_deltas


def _plan(assignment: Assignment, device: torch.device) -> _Plan | None:
    """Groups the rows by delta, so a delta costs one product however many rows carry it."""
    rows_of: dict[RowDelta, list[int]] = {}
    for row, deltas in enumerate(assignment):
        for delta in deltas:
            rows = rows_of.setdefault(delta, [])
            if not rows or rows[-1] != row:  # listed twice in one row, it still adds once
                rows.append(row)
    if not rows_of:
        return None
    plan: _Plan = {}
    for delta, rows in rows_of.items():
        index = None if len(rows) == len(assignment) else torch.tensor(rows, device=device)
        for name, (down, up) in delta.factors.items():
            plan.setdefault(name, []).append((index, down, up))
    return plan


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear layer: nn.Linear, or transformers' Conv1D (GPT-2)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if isinstance(nx, int) and isinstance(nf, int) and hasattr(module, "weight"):
        return nx, nf
    return None


__all__ = ["Assignment", "RowDelta", "RowDeltaHooks"]
