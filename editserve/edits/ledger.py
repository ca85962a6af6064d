"""The weight ledger: the only place weights change, and exact undo in any order.

The first time an edit touches a matrix, the ledger keeps a pristine copy of it in host (CPU)
memory, never on the model's device. When the last active edit on a matrix is undone, the matrix
gets its pristine bits back and the ledger drops everything it held for it.

The live matrix is a function of its pristine copy and the active deltas on it, in the order they
were applied, and of nothing else:

    live = cast(fold(pristine in float32, chunk 1, chunk 2, ...))

The deltas are grouped in order into chunks of `CHUNK`; a chunk is added in float32 as one matmul
of its stacked factors (`S.addmm_(U_c, V_c)`), then its dense deltas in order. Because the value
depends only on that list, undoing the middle of three edits equals applying the other two, bit
for bit, and undoing every edit gives the pristine weights back. An undo never subtracts: float
sums would not give the same bits back.

Cost: the ledger keeps one checkpoint per matrix, in host memory, once it has more than `CHUNK`
deltas: the float32 fold through every full chunk but the last. An apply, or an undo of one of
the newest deltas, folds one chunk onto it; an undo of an older delta folds every chunk from the
pristine copy, which costs about one matmul of all the active factors (1,000 rank-one deltas on a
576 x 1536 matrix: bench/ledger_undo.py; a delta at a time, that undo took ~120 ms). The fold runs
on the weight's device (its bits are that device's matmul's, the same every time there) and the
result is copied into the live tensor in place.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from methods.base import ParamDelta

# Deltas folded per matmul: an apply costs one chunk, an undo of an old delta every chunk.
CHUNK = 64


class DeltaRejected(ValueError):
    """A delta that does not fit the model (unknown parameter, wrong shape, not finite)."""


class WeightLedger:
    def __init__(self, model: nn.Module) -> None:
        self._params = dict(model.named_parameters())
        self._active: OrderedDict[str, ParamDelta] = OrderedDict()
        # Per edited matrix: its pristine weights (host), the active edits on it, oldest first,
        # and a host float32 checkpoint (n, fold of its first n deltas), n a multiple of CHUNK.
        self._pristine: dict[str, torch.Tensor] = {}
        self._order: dict[str, list[str]] = {}
        self._checkpoint: dict[str, tuple[int, torch.Tensor]] = {}

    @property
    def active_ids(self) -> list[str]:
        return list(self._active)

    def tracked(self) -> list[str]:
        """The matrices some active edit changes: the only ones the ledger holds copies of."""
        return sorted(self._pristine)

    def pristine(self, name: str) -> torch.Tensor | None:
        """The host copy of `name`'s weights before any active edit (None: no active edit
        touches it, the live weight is pristine). Read it, never write it."""
        return self._pristine.get(name)

    def held_bytes(self) -> int:
        """Host memory the ledger holds for the edited matrices (pristine copies, checkpoints)."""
        held = [*self._pristine.values(), *(t for _, t in self._checkpoint.values())]
        return sum(t.numel() * t.element_size() for t in held)

    def check(self, delta: ParamDelta) -> None:
        """Refuses a delta before anything changes."""
        if not delta.names():
            raise DeltaRejected("the edit changes no weight")
        for name in delta.names():
            param = self._params.get(name)
            if param is None:
                raise DeltaRejected(f"the model has no parameter {name}")
            if name in delta.dense:
                shape, finite = tuple(delta.dense[name].shape), _finite(delta.dense[name])
            else:
                u, v = delta.low_rank[name]
                shape = _low_rank_shape(name, u, v)
                finite = _finite(u) and _finite(v) and _product_bound(u, v) < _SAFE
            if shape != tuple(param.shape):
                raise DeltaRejected(
                    f"delta for {name} has shape {shape}, the weight {tuple(param.shape)}"
                )
            if not finite:
                raise DeltaRejected(f"delta for {name} is not finite")

    def apply(self, edit_id: str, delta: ParamDelta) -> None:
        assert edit_id not in self._active, f"edit {edit_id} is already applied"
        self.check(delta)
        self._active[edit_id] = delta
        for name in delta.names():
            if name not in self._pristine:
                self._pristine[name] = _host_copy(self._params[name])
                self._order[name] = []
            self._order[name].append(edit_id)
            self._compose(name)

    def revert(self, edit_id: str) -> ParamDelta:
        delta = self._active.pop(edit_id)
        for name in delta.names():
            order = self._order[name]
            position = order.index(edit_id)
            del order[position]
            if name in self._checkpoint and position < self._checkpoint[name][0]:
                del self._checkpoint[name]  # it folded the undone delta in
            self._compose(name)
        return delta

    def edited_keys(self, name: str) -> torch.Tensor:
        """The keys [m, in] the active edits wrote at parameter `name` ([0, in] when none)."""
        keys = [d.keys[name] for d in self._active.values() if name in d.keys]
        if keys:
            return torch.cat(keys)
        param = self._params[name]
        return torch.zeros(0, param.shape[-1], dtype=torch.float32)

    def delta_of(self, edit_id: str) -> ParamDelta:
        return self._active[edit_id]

    def _compose(self, name: str) -> None:
        """Writes pristine + the active deltas on `name` into the live weight, in place."""
        param, order = self._params[name], self._order[name]
        with torch.no_grad():
            if not order:
                # No delta left: exactly the original bits, whatever the weight's dtype. The
                # copy goes after that, so a pristine() reader always finds one or the other.
                param.copy_(self._pristine[name])
                del self._pristine[name], self._order[name]
                self._checkpoint.pop(name, None)
                return
            done, start = self._checkpoint.get(name, (0, self._pristine[name]))
            total = start.to(param.device, torch.float32, copy=True)
            keep = (len(order) - 1) // CHUNK * CHUNK  # every full chunk but the last
            for begin in range(done, len(order), CHUNK):
                if begin == keep and keep > done:
                    self._checkpoint[name] = (keep, total.to("cpu", copy=True))
                self._add_chunk(total, name, order[begin : begin + CHUNK])
            param.copy_(total)  # in place: never reassign a live tensor

    def _add_chunk(self, total: torch.Tensor, name: str, ids: list[str]) -> None:
        deltas = [self._active[edit_id] for edit_id in ids]
        # As ParamDelta.matrix: a dense delta wins over low-rank factors of the same name.
        factors = [d.low_rank[name] for d in deltas if name not in d.dense]
        if factors:
            # Stacked on the host (the deltas live there), then moved once.
            u = torch.cat([u for u, _ in factors], dim=1)
            v = torch.cat([v for _, v in factors], dim=0)
            total.addmm_(u.to(total.device, torch.float32), v.to(total.device, torch.float32))
        for d in deltas:
            if name in d.dense:
                total += d.dense[name].to(total.device, torch.float32)


_SAFE = torch.finfo(torch.float32).max / 2


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _low_rank_shape(name: str, u: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """The shape of U @ V, checked without forming it (an apply must stay O(delta))."""
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
        raise DeltaRejected(
            f"delta for {name}: factors of shapes {tuple(u.shape)} and {tuple(v.shape)} "
            "do not multiply"
        )
    return (u.shape[0], v.shape[1])


def _product_bound(u: torch.Tensor, v: torch.Tensor) -> float:
    """An upper bound of |U @ V| per entry: finite factors under it give a finite product."""
    return float((u.abs().amax(dim=0).double() * v.abs().amax(dim=1).double()).sum())


def _host_copy(param: torch.Tensor) -> torch.Tensor:
    """A copy of `param` in host memory with storage of its own (`.to` alone would share a
    CPU tensor's storage)."""
    return param.detach().to("cpu", copy=True)
