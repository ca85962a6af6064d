"""What the edit service answers, as plain records: the API shapes them into JSON
(`editserve.api.schemas`: EditPublic, DryRunPublic, EditDeleted)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EditRecord:
    """A committed edit as the journal holds it, with what this server made of it."""

    id: str
    method: str
    kind: str
    # "applied", "undone", or "not_replayed": journaled as applied, its payload refused at start
    status: str
    created_at: float | None
    applied_at: float | None
    undone_at: float | None
    model_version: int | None  # the version its commit made
    requests: list[dict]
    hparams: dict
    resolved_hparams: Any
    scope: str = "global"  # or "question": it reaches only requests within its scope
    error: str | None = None  # why it was not replayed
    # Its checks' report, timings and memory description, when they were stored.
    checks: dict | None = None
    timings: dict | None = None
    memory: dict | None = None
    # Only on the answer to the POST that made it:
    dry_run: bool | None = None
    delta: dict | None = None  # each changed matrix's shape, rank and norm


@dataclass(frozen=True)
class DryRun:
    """An edit computed and checked on the workbench, neither applied nor journaled."""

    method: str
    kind: str
    requests: list[dict]
    hparams: dict
    probes: list[str]
    resolved_hparams: Any
    model_version: int  # the served version it was computed against
    checks: dict
    timings: dict
    scope: str = "global"
    memory: dict | None = None
    delta: dict | None = None


@dataclass(frozen=True)
class UndoOutcome:
    id: str
    model_version: int
    later_edits: list[str]  # edits committed after it and still applied
    rebased: list[str]  # of those, the weight edits recomputed (DELETE ?rebase=true)
    timings: dict[str, float]  # undo_s
    # A failed rebase: the undo held, the later edits kept their deltas (edits.rebase).
    rebase_error: str | None = None
