"""Scoped edits: a weight edit that reaches only the requests within its scope.

`ScopedEdits` holds, per scoped edit, its delta in the form the engine adds to some rows of a
batch only (`row_delta_from`) and its scope entries (`memory.question_scope`: one per request
of the edit). Before a chat request is submitted, `decide` reads its user messages and answers
which edits apply and their row deltas: the request runs with those and no others, fixed at
admission. Everything else runs on the unedited weights, bit-identical.

A parameter method returns, per weight, U [out, r] and V [r, in] in the parameter's own layout
(ΔW = U @ V; nn.Linear stores [out, in], GPT-2's Conv1D [in, out]). The engine adds a scoped
edit to the rows in its scope as `(x @ down) @ up`, in input/output space, and knows no layout
(`editserve.engine.row_deltas`); this is where the layout is read.

Conflicts: edits in scope of one request apply together (two facts about one subject, a
question touching two edits), except that a newer edit of the same fact shadows an older one:
when a new edit's own prompts fall in an older edit's scope (same subject, same relation), the
older one is left out of every request that both reach. `generation` counts changes, so a
request decided before a change is decided again (as prompt memory is).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from editserve.engine.row_deltas import RowDelta
from memory.question_scope import QuestionScope, ScopeEntry, build_entry
from methods.base import EditRequest, ParamDelta


def row_delta_from(
    delta: ParamDelta,
    weight_is_transposed: bool,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    label: str = "",
) -> RowDelta:
    """`delta` as a `RowDelta` with factors in `dtype` on `device` (those of the live model).
    `weight_is_transposed`: the weights are stored [in, out] (GPT-2's Conv1D).

    Raises ValueError for a dense ΔW (FT-M): per row it would cost a full [in, out] product
    for each edit, so such an edit can only be global."""
    if delta.dense:
        raise ValueError(
            f"a scoped edit needs a low-rank delta; {', '.join(sorted(delta.dense))} "
            "carries a dense one (FT-M), which cannot be added per request cheaply: "
            "apply it to every request instead"
        )
    if not delta.low_rank:
        raise ValueError("the delta changes no weight: there is nothing to scope")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (u, v) in delta.low_rank.items():
        module, _, param = name.rpartition(".")
        if param != "weight":
            raise ValueError(f"only weight matrices can carry a scoped delta, not {name}")
        # nn.Linear computes x Wᵀ, so x ΔWᵀ = (x Vᵀ) Uᵀ; Conv1D computes x W, so x ΔW = (x U) V.
        down, up = (u, v) if weight_is_transposed else (v.T, u.T)
        factors[module] = (
            down.to(device=device, dtype=dtype).contiguous(),  # [in, r]
            up.to(device=device, dtype=dtype).contiguous(),  # [r, out]
        )
    return RowDelta(factors, label)


@dataclass(frozen=True)
class PreparedScope:
    """A scoped edit's scope, embedded and checked against the edits already live (off the
    engine thread: the encoder runs here)."""

    entries: list[ScopeEntry]
    vectors: list[dict[str, np.ndarray]]  # per entry: masked text -> vector
    shadows: frozenset[str]  # older edits of the same fact, which this one overrides


def entry_id(edit_id: str, request_index: int) -> str:
    return f"{edit_id}/{request_index}"


def edit_of(entry: str) -> str:
    return entry.rpartition("/")[0]


class ScopedEdits:
    def __init__(self, scope: QuestionScope) -> None:
        self.scope = scope
        self._deltas: dict[str, RowDelta] = {}
        self._shadows: dict[str, frozenset[str]] = {}
        self._generation = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._deltas)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._deltas

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def prepare(
        self, edit_id: str, requests: Sequence[EditRequest], locality: Sequence[str]
    ) -> PreparedScope:
        """The scope of each request (its prompt, rephrasings and rewordings; negatives from the
        same subject's other relations and `locality`), embedded. Runs the encoder."""
        entries = [
            build_entry(entry_id(edit_id, i), r.prompt, r.subject, r.rephrase, locality)
            for i, r in enumerate(requests)
        ]
        shadows = {edit_of(e) for entry in entries for e in self.scope.decide([entry.positives[0]])}
        return PreparedScope(
            entries, [self.scope.embed(e) for e in entries], frozenset(shadows - {edit_id})
        )

    def add(self, edit_id: str, delta: RowDelta, prepared: PreparedScope) -> None:
        """Makes the edit decidable: requests decided from now on may carry `delta`."""
        for entry, vectors in zip(prepared.entries, prepared.vectors, strict=True):
            self.scope.add(entry, vectors)
        with self._lock:
            self._deltas[edit_id] = delta
            self._shadows[edit_id] = prepared.shadows
            self._generation += 1

    def remove(self, edit_id: str) -> RowDelta | None:
        """No request decided from now on carries the edit; those running keep it."""
        with self._lock:
            delta = self._deltas.pop(edit_id, None)
            self._shadows.pop(edit_id, None)
            self._generation += 1
        for entry in [e.edit_id for e in self.scope.entries() if edit_of(e.edit_id) == edit_id]:
            self.scope.remove(entry)
        return delta

    def decide(self, user_messages: Sequence[str]) -> tuple[list[str], tuple[RowDelta, ...]]:
        """The edits whose scope the conversation (its user messages, last one last) falls in,
        newest first, less those a newer one among them shadows; and their row deltas."""
        if not self._deltas or not user_messages:
            return [], ()
        reached = list(dict.fromkeys(edit_of(e) for e in self.scope.decide(user_messages)))
        with self._lock:
            live = [e for e in reached if e in self._deltas]
            shadowed = {old for e in live for old in self._shadows[e]}
            chosen = [e for e in live if e not in shadowed]
            return chosen, tuple(self._deltas[e] for e in chosen)

    def preview(self, prepared: PreparedScope) -> Callable[[str], bool]:
        """Whether a question falls in a not yet applied edit's scope (dry runs), decided by
        the edit's scope alone."""
        alone = QuestionScope(self.scope.encoder, self.scope.tau, self.scope.margin)
        for entry, vectors in zip(prepared.entries, prepared.vectors, strict=True):
            alone.add(entry, vectors)
        return lambda question: bool(alone.decide([question]))


def entries_json(prepared: PreparedScope) -> list[dict]:
    return [e.to_json() for e in prepared.entries]


def prepared_from_json(
    scope: QuestionScope, data: list[dict], shadows: Sequence[str]
) -> PreparedScope:
    """A journaled scope, embedded again (the encoder is deterministic on one machine)."""
    entries = [ScopeEntry.from_json(d) for d in data]
    return PreparedScope(entries, [scope.embed(e) for e in entries], frozenset(shadows))
