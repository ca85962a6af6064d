"""Where each committed edit lives in the running model, put there and taken back.

Three places: the weights (ROME, MEMIT, AlphaEdit, FT-M with scope "global", through the
ledger), the edit memory (IKE, ICE, SERAC, GRACE: `memory_edits`), and the scoped edits (a
weight edit with scope "question": a row delta and its scope, `scoped`). `put` and `take_back`
run on the engine thread, through `run` (with no request in flight for what a running
generation computes with: weights, a layer codebook; between two decode steps for what only new
requests see: prompt memory, scoped edits).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import torch

from editserve.edits.ledger import WeightLedger
from editserve.edits.memory_edits import MemoryEdits
from editserve.edits.methods import METHODS
from editserve.edits.scoped import PreparedScope, ScopedEdits, prepared_from_json, row_delta_from
from editserve.engine.row_deltas import RowDelta
from editserve.engine.transformers_engine import TransformersEngine
from methods.base import ParamDelta
from methods.memory_common import MemoryPayload

Place = Literal["weights", "memory", "scoped"]


@dataclass(frozen=True)
class Placed:
    """A computed edit made ready to go live: what `put` needs."""

    method: str
    place: Place
    delta: ParamDelta | None = None  # weights
    payload: MemoryPayload | None = None  # memory
    row_delta: RowDelta | None = None  # scoped
    scope: PreparedScope | None = None  # scoped


class LiveEdits:
    def __init__(
        self,
        engine: TransformersEngine,
        ledger: WeightLedger,
        memory: MemoryEdits,
        scoped: ScopedEdits,
        weights_transposed: bool,
    ) -> None:
        self.engine, self.ledger, self.memory, self.scoped = engine, ledger, memory, scoped
        self._transposed = weights_transposed
        self._place_of: dict[str, Place] = {}

    def placed(
        self, edit_id: str, method: str, result: Any, scope: PreparedScope | None = None
    ) -> Placed:
        """`result` ready to go live: a scoped edit's delta in the engine's row form."""
        if isinstance(result, MemoryPayload):
            return Placed(method, "memory", payload=result)
        if scope is None:
            return Placed(method, "weights", delta=result)
        weight = next(self.engine.model.parameters())
        row = row_delta_from(
            result, self._transposed, dtype=weight.dtype, device=weight.device, label=edit_id
        )
        return Placed(method, "scoped", row_delta=row, scope=scope)

    def stage(self, placed: Placed) -> Future | None:
        """What must happen before `put`, off the critical section: a scoped edit's modules
        hooked (no request carries it yet, so no answer changes)."""
        if placed.row_delta is None:
            return None
        return self.engine.register_row_delta(placed.row_delta)

    def run(self, placed: Place, method: str, change: Callable[[], int]) -> Future:
        """`change` on the engine thread: after a drain for weights and codebooks, between
        two decode steps for prompt memory and scoped edits."""
        if placed == "scoped" or not METHODS[method].drains:
            return self.engine.run_between_steps(change)
        return self.engine.run_exclusive(change)

    def place_of(self, edit_id: str) -> Place | None:
        return self._place_of.get(edit_id)

    def put(self, edit_id: str, placed: Placed) -> None:
        if placed.place == "memory":
            assert placed.payload is not None
            self.memory.register(edit_id, placed.method, placed.payload)
        elif placed.place == "scoped":
            assert placed.row_delta is not None and placed.scope is not None
            self.scoped.add(edit_id, placed.row_delta, placed.scope)
        else:
            assert placed.delta is not None
            self.ledger.apply(edit_id, placed.delta)
        self._place_of[edit_id] = placed.place

    def take_back(self, edit_id: str) -> None:
        """The edit out of the live model (running requests keep a scoped edit's delta)."""
        place = self._place_of.pop(edit_id, None)
        if place == "memory":
            self.memory.remove(edit_id)
        elif place == "scoped":
            if (row := self.scoped.remove(edit_id)) is not None:
                self.engine.unregister_row_delta(row)  # queued: hooks go with the last request
        elif place == "weights":
            self.ledger.revert(edit_id)

    def from_journal(self, row: Any, tensors: dict[str, torch.Tensor]) -> Placed:
        """A journaled edit ready to go live again (replay): its scope embedded again."""
        if METHODS[row.method].payload == "memory":
            payload = MemoryPayload(row.spec["memory"]["entries"], tensors)
            return self.placed(row.id, row.method, payload)
        scope = None
        if row.spec.get("scope") == "question":
            entries, shadows = row.spec["scope_entries"], row.spec.get("shadows", ())
            scope = prepared_from_json(self.scoped.scope, entries, shadows)
        return self.placed(row.id, row.method, ParamDelta.from_tensors(tensors), scope)
