"""GRACE's codebook at one module (Hartvigsen et al.; methods.md §5), tokenizer-free.

The wrapped module is meant to be a block's MLP down-projection (EasyEdit's placement): keys are
its input (d_ff), values replace its output (d_model), i.e. the MLP's whole contribution to the
residual stream at that position, while attention and the residual pass through untouched.

Lookup, per token (x: [..., d_in]): the nearest key by Euclidean distance (float32); if the
distance is within that key's radius ε, the output at that position becomes the key's value.
Every position is checked, in prefill and at each decoding step, so a hook needs no notion of
"the last prompt token"; positions that hit nothing keep their output bit for bit.

Adding follows GRACE's rules (new / cover / expand / split / supersede): `memory.grace_rules`.

The codebook is the fold of its ops (one per `add`) in order. Removing an edit refolds the
other ops, so the result is exactly the codebook that edit never touched, expansions and splits
included; with no ops left, the hook returns the module's output unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from memory.grace_rules import Decision, Fold, Op, Plan, apply_op, plan_op
from memory.json_tensors import json_tensor, tensor_json

__all__ = ["Codebook", "Decision", "Plan", "lookup", "substitute"]


@dataclass(frozen=True, eq=False)
class _Table:
    """An immutable snapshot the hook reads; `trial` swaps one row for a trainable value."""

    keys: torch.Tensor  # [n, d_in]
    values: torch.Tensor  # [n, d_out]
    radii: torch.Tensor  # [n] float32
    trial: tuple[int, torch.Tensor] | None = None
    cache: dict[torch.device, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self.cache:  # a benign race: both writers store equal tensors
            self.cache[device] = (
                self.keys.to(device),
                self.values.to(device),
                self.radii.to(device),
            )
        keys, values, radii = self.cache[device]
        if self.trial is not None:  # out of place, so the gradient reaches the trial value
            row, value = self.trial
            rows = torch.tensor([row], device=device)
            values = values.index_put((rows,), value.to(device, values.dtype)[None])
        return keys, values, radii


def _table(fold: Fold, trial: tuple[int, torch.Tensor] | None = None) -> _Table:
    """A snapshot of `fold`: keys are views (rows never change), values and radii copies."""
    if not fold.entries:
        return _Table(torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0), trial)
    return _Table(
        fold.keys[: len(fold.entries)],
        torch.stack([e.value for e in fold.entries]),
        torch.tensor([e.radius for e in fold.entries], dtype=torch.float32),
        trial,
    )


def lookup(table: _Table, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest entry [...] and whether x lies within its radius [...], for x [..., d_in]."""
    flat = x.reshape(-1, x.shape[-1]).float()  # [N, d_in]
    keys, _, radii = table.on(flat.device)
    if len(keys) == 0:
        empty = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        return empty.view(x.shape[:-1]), empty.bool().view(x.shape[:-1])
    nearest = torch.cdist(flat, keys).argmin(dim=1)  # [N]
    # The distance that decides is recomputed directly: cdist's matmul form loses precision.
    dist = (flat - keys[nearest]).norm(dim=1)  # [N]
    return nearest.view(x.shape[:-1]), (dist <= radii[nearest]).view(x.shape[:-1])


def substitute(table: _Table, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` ([..., d_out]) with the value of the hit entry wherever x ([..., d_in]) hits one."""
    if len(table.keys) == 0:
        return out
    nearest, hit = lookup(table, x)  # [...], [...]
    if not bool(hit.any()):
        return out
    _, values, _ = table.on(out.device)
    return torch.where(hit[..., None], values[nearest].to(out.dtype), out)


class Codebook:
    """GRACE codebook: `add`/`remove` edits, `attach` to a module, persist with `to_tensors`.

    Thread-safe: writers are serialised; the hook reads an immutable snapshot, swapped whole.
    """

    def __init__(self, radius: float = 1.0, tolerance: float = 1e-3) -> None:
        self.radius = radius  # default ε₀
        self.tolerance = tolerance
        self._lock = threading.Lock()
        self._ops: list[Op] = []
        self._fold = Fold()
        self._table = _table(self._fold)

    def __len__(self) -> int:
        """Number of entries (keys)."""
        return len(self._table.keys)

    def edit_ids(self) -> list[str]:
        with self._lock:
            return list(dict.fromkeys(op.edit_id for op in self._ops))

    def describe(self) -> list[dict[str, object]]:
        """One dict per entry: label, radius, owners (edit ids), in entry order."""
        with self._lock:
            return [
                {"label": e.label, "radius": e.radius, "owners": list(e.owners)}
                for e in self._fold.entries
            ]

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lookup(self._table, x)

    def _op(
        self,
        edit_id: str,
        key: torch.Tensor,
        label: str,
        value: torch.Tensor | None,
        radius: float | None,
    ) -> Op:
        """Detached float32 CPU copies: the caller's tensors may change or live on a GPU."""
        key = key.detach().float().reshape(-1).cpu().clone()  # [d_in]
        if value is not None:
            value = value.detach().float().reshape(-1).cpu().clone()  # [d_out]
        for op in self._ops[:1]:  # every op must match the first one's shapes
            if key.shape != op.key.shape or (
                value is not None and op.value is not None and value.shape != op.value.shape
            ):
                raise ValueError(f"key/value sizes differ from the codebook's ({op.key.numel()})")
        return Op(edit_id, key, label, value, self.radius if radius is None else float(radius))

    def _refold(self, ops: list[Op]) -> None:
        fold = Fold()
        for op in ops:
            apply_op(fold, op, self.tolerance, strict=False)
        self._ops, self._fold, self._table = ops, fold, _table(fold)

    def plan(self, key: torch.Tensor, label: str, radius: float | None = None) -> Plan:
        """What `add` would do now; changes nothing."""
        with self._lock:
            return plan_op(self._fold, self._op("", key, label, None, radius), self.tolerance)

    def add(
        self,
        edit_id: str,
        key: torch.Tensor,
        label: str,
        value: torch.Tensor | None,
        radius: float | None = None,
    ) -> Plan:
        op = self._op(edit_id, key, label, value, radius)
        with self._lock:
            plan, _ = apply_op(self._fold, op, self.tolerance)
            self._ops.append(op)
            self._table = _table(self._fold)
            return plan

    def remove(self, edit_id: str) -> int:
        """Refolds every op but `edit_id`'s; returns how many ops were dropped.

        An edit added without a value (it covered or expanded another edit's entry) loses its
        effect when that entry goes: it stays listed but adds nothing."""
        with self._lock:
            kept = [op for op in self._ops if op.edit_id != edit_id]
            dropped = len(self._ops) - len(kept)
            if dropped:
                self._refold(kept)
            return dropped

    def serve(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` with the current codebook applied (for a hook of the caller's own)."""
        return substitute(self._table, x, out)

    def attach(self, module: nn.Module) -> RemovableHandle:
        """Serves the codebook on `module` until the handle is removed."""
        return module.register_forward_hook(
            lambda _m, inputs, out: substitute(self._table, inputs[0], out)
        )

    @contextmanager
    def attached(
        self,
        module: nn.Module,
        key: torch.Tensor | None = None,
        label: str = "",
        value: torch.Tensor | None = None,
        radius: float | None = None,
    ) -> Iterator[Plan | None]:
        """Serves the codebook on `module` (a workbench's) for the block; with `key` and
        `value`, as if `add(key, label, value)` had happened, `value` staying the very tensor
        (so a loss through the module has a gradient in it, and in-place updates show)."""
        plan, table = None, self._table
        if key is not None:
            if value is None:
                raise ValueError("a trial entry needs a value")
            with self._lock:
                fold = self._fold.copy()
            op = self._op("<trial>", key, label, torch.zeros_like(value.reshape(-1)), radius)
            plan, row = apply_op(fold, op, self.tolerance)
            table = _table(fold, trial=(row, value.reshape(-1)))
        handle = module.register_forward_hook(
            lambda _m, inputs, out: substitute(table, inputs[0], out)
        )
        try:
            yield plan
        finally:
            handle.remove()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The ops (not the derived entries): `from_tensors` refolds them to the same table."""
        with self._lock:
            ops = list(self._ops)
        d_out = next((op.value.numel() for op in ops if op.value is not None), 0)
        meta = {
            "radius": self.radius,
            "tolerance": self.tolerance,
            "ops": [[op.edit_id, op.label, op.radius, op.value is not None] for op in ops],
        }
        flat = {"meta": json_tensor(meta)}
        if ops:
            flat["keys"] = torch.stack([op.key for op in ops])  # [n_ops, d_in]
            zeros = torch.zeros(d_out)
            flat["values"] = torch.stack([zeros if op.value is None else op.value for op in ops])
        return flat

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> Codebook:
        meta = tensor_json(flat["meta"])
        codebook = cls(radius=meta["radius"], tolerance=meta["tolerance"])
        ops = [
            codebook._op(edit_id, flat["keys"][i], label, flat["values"][i] if has else None, r)
            for i, (edit_id, label, r, has) in enumerate(meta["ops"])
        ]
        with codebook._lock:
            codebook._refold(ops)
        return codebook
