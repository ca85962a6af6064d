"""DELETE /edits/{id}?rebase=true: the later weight edits recomputed on the model without the
undone one, crash-safe and failure-atomic.

The undo is committed before a rebase starts. The rebase then replaces the deltas of every later
edit or of none:

- the later edits leave the live weights, then each is recomputed and re-applied in turn (the
  server answers without the not-yet-rebased ones meanwhile; each step is a new model version);
- each new payload is written under a new file name, and once all are computed the rows switch
  to them in one transaction (`Journal.switch_payloads`): a crash before the switch restarts with
  the old deltas, one after it with the new ones, and never with a row naming a file it lacks;
- a failure anywhere (a method that raises, a delta the ledger refuses, a state folder that
  refuses a write) puts the old deltas back in their order, so the weights are bit-identical to
  those right after the undo, and the answer says that the undo held and the rebase did not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from editserve.edits.journal import Journal, StagedPayload
from editserve.edits.ledger import WeightLedger
from editserve.engine.transformers_engine import TransformersEngine
from editserve.faults import crash_point
from editserve.threads import in_worker
from methods.base import ParamDelta

log = logging.getLogger(__name__)


@dataclass
class RebaseOutcome:
    rebased: list[str]  # the edits now live with recomputed deltas: all of them, or none
    error: str | None = None  # why none were, for the client


async def rebase(
    undone: str,
    later: list[str],
    ledger: WeightLedger,
    engine: TransformersEngine,
    journal: Journal,
    recompute: Callable[[str], Awaitable[ParamDelta]],
) -> RebaseOutcome:
    """Recomputes `later` (weight edits, oldest first, all live) with `recompute`, in order,
    each on the model with the ones before it rebased."""
    old = {edit_id: ledger.delta_of(edit_id) for edit_id in later}
    # Read and written on the engine thread only: what the live weights hold right now.
    taken_out: list[str] = []
    put_in: list[str] = []
    staged: list[StagedPayload] = []

    def take_out() -> None:
        for edit_id in reversed(later):
            ledger.revert(edit_id)
            taken_out.append(edit_id)
        engine.model_version = journal.bump_version()

    def restore() -> None:
        for edit_id in reversed(put_in):
            ledger.revert(edit_id)
        # Back in their order, after the edits before them: the same float32 sums, so the
        # same bits as before the rebase.
        for edit_id in later:
            if edit_id in taken_out:
                ledger.apply(edit_id, old[edit_id])
        try:
            engine.model_version = journal.bump_version()
        except Exception as exc:  # noqa: BLE001 (the weights are back; only the number is not)
            log.error("rebase: the model version could not be journaled: %s", exc)

    try:
        await asyncio.wrap_future(engine.run_exclusive(take_out))
        for edit_id in later:
            delta = await recompute(edit_id)
            staged.append(await in_worker(journal.stage_payload, edit_id, delta.to_tensors()))

            def apply(edit_id: str = edit_id, delta: ParamDelta = delta) -> None:
                ledger.apply(edit_id, delta)
                put_in.append(edit_id)
                engine.model_version = journal.bump_version()

            await asyncio.wrap_future(engine.run_exclusive(apply))
        crash_point("after_rebase_payload")
        await in_worker(journal.switch_payloads, staged)
    except BaseException as exc:
        # Queued behind whatever this rebase already queued: it sees what really ran.
        await asyncio.wrap_future(engine.run_exclusive(restore))
        await in_worker(journal.discard, staged)
        if not isinstance(exc, Exception):
            raise
        reason = str(exc) or type(exc).__name__
        log.error("rebase after undoing %s failed, the old deltas are back: %s", undone, reason)
        return RebaseOutcome(
            [],
            f"the undo of {undone} held, but the later edits could not be rebased ({reason}): "
            f"{', '.join(later)} keep their earlier deltas, exactly as before, computed on the "
            "model with the undone edit. Undo and re-create them to recompute them.",
        )
    return RebaseOutcome(later)
