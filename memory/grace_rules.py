"""GRACE's rules for adding to a codebook (Hartvigsen et al.; methods.md §5), as a fold.

Adding an op (key, label, value, ε₀) follows GRACE, against the nearest entry j at distance d:
- d > ε₀ + ε_j: a new entry (key, value, ε₀);
- overlap, same label: *cover* (d ≤ ε_j) or *expand* (ε_j = d + tolerance); the entry takes the
  op's value if it brings one (GRACE re-trains it);
- overlap, different labels: *split*: ε_j = min(ε_j, d/2 − 1e-5), new entry with min(ε₀, d/2);
- different labels at the same key (d ≤ tolerance): *supersede*, the newest edit wins (GRACE's
  split would leave two radius-0 entries there, the older one found first).
Keys never move (GRACE's "coverage" variant, not "moving_avg").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch


class Decision(StrEnum):
    NEW = "new"
    COVER = "cover"
    EXPAND = "expand"
    SPLIT = "split"
    SUPERSEDE = "supersede"


@dataclass(frozen=True)
class Op:
    """One `add`: what the codebook stores and refolds."""

    edit_id: str
    key: torch.Tensor  # [d_in] float32
    label: str  # equal labels = same target (the method decides what that means)
    value: torch.Tensor | None  # [d_out] float32; None keeps the covering entry's value
    radius: float  # ε₀


@dataclass(frozen=True)
class Plan:
    decision: Decision
    # The nearest entry where the rule acts on it (cover/expand/supersede: it takes the value;
    # split: it shrinks and a new entry takes the value); None for a plain new entry.
    entry: int | None
    distance: float | None  # to the nearest key; None in an empty codebook
    # The value the op's value replaces (cover/expand/supersede), a warm start; None otherwise
    # (then the module's own output at the key is the natural warm start).
    init_value: torch.Tensor | None


@dataclass
class Entry:
    key: torch.Tensor
    value: torch.Tensor
    radius: float
    label: str
    owners: list[str]


@dataclass
class Fold:
    """The entries, in order, with their keys also stacked for the nearest-key search. Keys
    never move, so rows once written never change and tables may hold views of them."""

    entries: list[Entry] = field(default_factory=list)
    keys: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # [capacity, d_in]

    def append(self, entry: Entry) -> None:
        n = len(self.entries)
        if n == len(self.keys):  # doubling: amortised O(d_in) per entry
            grown = torch.empty(max(64, 2 * n), entry.key.numel())
            if n:
                grown[:n] = self.keys[:n]
            self.keys = grown
        self.keys[n] = entry.key
        self.entries.append(entry)

    def copy(self) -> Fold:
        n = len(self.entries)
        entries = [replace(e, owners=list(e.owners)) for e in self.entries]
        return Fold(entries, self.keys[:n].clone())


def plan_op(fold: Fold, op: Op, tolerance: float) -> Plan:
    if not fold.entries:
        return Plan(Decision.NEW, None, None, None)
    dists = (fold.keys[: len(fold.entries)] - op.key).norm(dim=1)  # [n]
    j = int(dists.argmin())
    d, near = float(dists[j]), fold.entries[j]
    if d > op.radius + near.radius:
        return Plan(Decision.NEW, None, d, None)
    if near.label != op.label:
        if d <= tolerance:
            return Plan(Decision.SUPERSEDE, j, d, near.value.clone())
        return Plan(Decision.SPLIT, j, d, None)
    kind = Decision.COVER if d <= near.radius else Decision.EXPAND
    return Plan(kind, j, d, near.value.clone())


def apply_op(fold: Fold, op: Op, tolerance: float, strict: bool = True) -> tuple[Plan, int]:
    """Folds `op` into `fold` (in place); returns the plan and the entry holding its value.

    An op without a value that would need a new entry raises; with `strict=False` (refolding
    after a removal took away the entry it relied on) it is skipped, entry -1, as if it had
    never been added, which it could not have been without that entry.
    """
    plan = plan_op(fold, op, tolerance)
    if plan.decision in (Decision.NEW, Decision.SPLIT):
        if op.value is None:  # checked before anything changes
            if not strict:
                return plan, -1
            raise ValueError(f"edit {op.edit_id}: a {plan.decision} entry needs a value")
        radius = op.radius
        if plan.decision is Decision.SPLIT:
            assert plan.entry is not None and plan.distance is not None
            near = fold.entries[plan.entry]
            near.radius = min(near.radius, plan.distance / 2 - 1e-5)
            radius = min(radius, plan.distance / 2)
        fold.append(Entry(op.key, op.value, radius, op.label, [op.edit_id]))
        return plan, len(fold.entries) - 1
    assert plan.entry is not None and plan.distance is not None
    near = fold.entries[plan.entry]
    if plan.decision is Decision.EXPAND:
        near.radius = plan.distance + tolerance  # a margin: live keys differ by rounding
    if plan.decision is Decision.SUPERSEDE:
        near.label = op.label
    if op.value is not None:
        near.value = op.value
    near.owners.append(op.edit_id)
    return plan, plan.entry
