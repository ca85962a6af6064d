"""EditService: create, commit, undo, rebase, replay and list edits.

Edits run one at a time (a lock). A method computes on the workbench in a worker thread while
the engine keeps serving; its result is applied through the engine's exclusive section, so no
answer mixes two versions of the model. Parameter methods give a `ParamDelta` (the ledger applies
it); memory methods (IKE, ICE, SERAC, GRACE) give a `MemoryPayload` that the live edit memory
registers (`editserve.edits.memory_edits`). Both are journaled alike and undone in any order.
Requests are checked first (`validation`); the answer reports what users will meet: the greedy
chat answers to the edited prompts and to a few unrelated probes, before and after (`checks`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass, replace
from typing import Any

import torch
from safetensors import SafetensorError

from editserve.edits.checks import DEFAULT_PROBES, EditChecks, check_report, describe_delta
from editserve.edits.errors import AlreadyUndone, EditNotFound, InvalidEdit, StorageRefused
from editserve.edits.journal import STAGED_MARKER, CorruptPayload, Journal, fingerprint
from editserve.edits.ledger import DeltaRejected, WeightLedger
from editserve.edits.live import LiveEdits, Placed
from editserve.edits.memory_edits import MemoryEdits, describe
from editserve.edits.methods import METHODS
from editserve.edits.outcomes import DryRun, EditRecord, UndoOutcome
from editserve.edits.rebase import RebaseOutcome
from editserve.edits.rebase import rebase as rebase_later
from editserve.edits.scoped import ScopedEdits, entries_json
from editserve.edits.statistics import Statistics, default_layers
from editserve.edits.validation import EditSpec, EditValidator
from editserve.engine.transformers_engine import TransformersEngine
from editserve.faults import crash_point
from editserve.heap import give_back_free_memory
from editserve.prompts import PromptRenderer
from editserve.threads import in_worker
from memory.encoder import SentenceEncoder
from memory.question_scope import QuestionScope
from memory.scope import ScopeClassifier
from methods.architectures import resolve
from methods.base import EditContext, EditRequest, ParamDelta
from methods.memory_common import MemoryPayload
from methods.spec import MethodSpec
from methods.stats import StatsCache, StatsSource
from methods.workbench import make_workbench

log = logging.getLogger(__name__)

# What a full, read-only or vanished state folder raises while the journal writes.
STORAGE_ERRORS = (OSError, sqlite3.Error, SafetensorError)


class EditService:
    def __init__(
        self,
        engine: TransformersEngine,
        journal: Journal,
        stats_cache: StatsCache | None = None,
        stats_source: StatsSource | None = None,
        encoder: SentenceEncoder | None = None,
        scope: ScopeClassifier | None = None,
    ) -> None:
        self.engine = engine
        self.journal = journal
        self.ledger = WeightLedger(engine.model)
        self.tokenizer = engine.tokenizer
        self._lock = asyncio.Lock()
        base_fingerprint = fingerprint(engine.model)
        # MEMIT's and AlphaEdit's statistics, on pristine weights (editserve.edits.statistics)
        self.statistics = (
            Statistics(
                engine.model,
                self.tokenizer,
                self.ledger,
                stats_cache,
                stats_source or StatsSource(),
                engine.device,
                base_fingerprint,
            )
            if stats_cache is not None
            else None
        )
        workbench = make_workbench(engine.model)
        self.context = EditContext(
            model=workbench,
            tokenizer=self.tokenizer,
            arch=resolve(workbench),
            chat_prompt=self.chat_prompt,
            device=engine.device,
            model_fingerprint=base_fingerprint,
            second_moments=self.second_moments if self.statistics is not None else None,
            moment_eigh=self.statistics.eigh if self.statistics is not None else None,
            edited_keys=self.ledger.edited_keys,
        )
        self.memory = MemoryEdits(resolve(engine.model), self.context.arch, encoder, scope)
        self.prompts = PromptRenderer(self.tokenizer, engine.max_model_len, self.memory)
        self.scoped = ScopedEdits(QuestionScope(self.memory.encoder))
        transposed = self.context.arch.layout.transposed
        self.live = LiveEdits(engine, self.ledger, self.memory, self.scoped, transposed)
        self.checks = EditChecks(engine, self.prompts, workbench, self.memory, self.scoped)
        config = engine.model.config
        self.validator = EditValidator(
            self.tokenizer,
            config.model_type,
            config.num_hidden_layers,
            engine.max_model_len,
            self.chat_prompt,
            self.memory.unavailable,
            self.memory.encoder.unavailable,
        )
        # Every method's defaults resolve for this model, or the start fails (MissingDefaults):
        # a copy installed without methods/configs would otherwise edit with untuned values.
        for spec in METHODS.values():
            self.validator.resolve_hparams(spec, {})
        # Journaled as applied but refused at replay (a damaged payload): id -> why.
        self.unreplayed: dict[str, str] = {}

    def second_moments(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """E[kkᵀ] per layer of the base model: loaded, or computed on its pristine weights."""
        assert self.statistics is not None
        return self.statistics.get(layers)

    def start_statistics(self) -> None:
        """Computes MEMIT's and AlphaEdit's default layers in the background (start-up)."""
        if self.statistics is not None:
            config = self.engine.model.config
            self.statistics.start(default_layers(config.model_type, config.num_hidden_layers))

    def chat_prompt(self, question: str) -> list[int]:
        """What methods optimise after (`EditContext.chat_prompt`): no memory edits in it."""
        return self.prompts.question_prompt(question)

    def served_prompt(self, question: str) -> list[int]:
        """The prompt the chat route would feed for `question` in an edit's checks."""
        return self.checks.served_prompt(question)

    # -- start-up ----------------------------------------------------------------------------------

    def replay(self) -> None:
        """Binds the journal to these base weights and re-applies its edits from stored deltas.

        Call before serving starts (the engine thread is not running yet)."""
        self.journal.bind(self.context.model_fingerprint)
        for row in self.journal.pending():
            log.warning(
                "edit %s was never committed (the server stopped mid-edit): dropped", row.id
            )
            self.journal.mark_failed(row.id)
        swept = self.journal.sweep()
        for name in swept:
            log.warning("removed %s: a payload no journal row names (left by a crash)", name)
        if any(STAGED_MARKER in name for name in swept):
            # A rebase cut short served versions whose weights this start does not rebuild.
            self.journal.bump_version()
        replayed = 0
        for row in self.journal.list(("applied",)):
            spec = METHODS.get(row.method)
            try:
                if spec is None:
                    raise ValueError(f"this server has no method {row.method!r}")
                placed = self.live.from_journal(row, self.journal.load_payload(row.id))
                self.live.stage(placed)  # the engine is not running: done at once
                self.live.put(row.id, placed)
                replayed += 1
            except Exception as exc:  # noqa: BLE001 (one bad edit must not stop the others)
                reason = str(exc) if isinstance(exc, CorruptPayload) else f"{exc!r}"
                log.error(
                    "edit %s NOT replayed, the model serves without it: %s (DELETE it to drop "
                    "it from the journal)",
                    row.id,
                    reason,
                )
                self.unreplayed[row.id] = reason
        if self.memory.has_prompt_entries() or len(self.scoped):
            self.memory.encoder.load()  # now, not on the first chat request
        self.engine.model_version = self.journal.version
        if replayed:
            log.info("replayed %d edit(s); model version %d", replayed, self.engine.model_version)

    # -- create ------------------------------------------------------------------------------------

    async def create(
        self,
        method: str,
        kind: str,
        requests: list[dict],
        hparams: dict | None,
        dry_run: bool = False,
        checks: bool = True,
        scope: str | None = None,
    ) -> EditRecord | DryRun:
        edit, spec, resolved = self.validator.validate(method, kind, requests, hparams, scope)
        # Statistics still computing at start-up: waited for here, not holding the edit lock.
        stats = self.statistics if spec.reads_second_moments else None
        stats_wait = await stats.wait() if stats is not None else 0.0
        async with self._lock:
            timings: dict[str, float] = {"stats_wait_s": stats_wait} if stats_wait else {}
            started = time.monotonic()
            questions = [q for r in edit.requests for q in (r.prompt, *r.rephrase)]
            probes = [*DEFAULT_PROBES, *edit.probes]
            before = await self.checks.answers(questions + probes) if checks else []
            timings["checks_before_s"] = time.monotonic() - started

            t = time.monotonic()
            try:
                result = await in_worker(
                    self._compute, spec, self._context_now(), edit.requests, resolved
                )
            except (ValueError, DeltaRejected) as exc:
                raise InvalidEdit(str(exc), "requests") from exc
            timings["compute_s"] = time.monotonic() - t

            edit_id = f"edit-{uuid.uuid4().hex[:16]}"
            plain = asdict(resolved) if is_dataclass(resolved) else resolved
            record_spec = {**edit.to_json(), "resolved_hparams": plain}
            memory = isinstance(result, MemoryPayload)
            if memory:
                record_spec["memory"] = {"entries": result.entries}
            scoped = None
            if edit.scope == "question":
                scoped = await in_worker(self.scoped.prepare, edit_id, edit.requests, edit.probes)
                record_spec["scope_entries"] = entries_json(scoped)
                record_spec["shadows"] = sorted(scoped.shadows)
            if dry_run:
                in_scope = self.scoped.preview(scoped) if scoped is not None else None
                after = (
                    await in_worker(
                        self.checks.previewed_answers, questions + probes, result, method, in_scope
                    )
                    if checks
                    else []
                )
                version = self.engine.model_version
            else:
                t = time.monotonic()
                placed = await in_worker(self.live.placed, edit_id, method, result, scoped)
                version = await self._commit(edit_id, edit, record_spec, result, placed)
                timings["apply_s"] = time.monotonic() - t
                after = await self.checks.answers(questions + probes) if checks else []
            timings["total_s"] = time.monotonic() - started
            report = (
                check_report(edit, questions, probes, before, after, self.tokenizer)
                if checks
                else {}
            )
            summary: dict[str, Any] = {"checks": report, "timings": timings}
            if memory:
                summary["memory"] = describe(method, result)
            if not dry_run:
                try:
                    self.journal.set_summary(edit_id, summary)
                except STORAGE_ERRORS as exc:  # the edit is committed; only its report is lost
                    log.warning("edit %s: its checks could not be stored: %s", edit_id, exc)
        # matrix products: off the event loop
        delta = None if memory else await in_worker(describe_delta, result)
        if dry_run:
            return DryRun(
                method=edit.method,
                kind=edit.kind,
                requests=record_spec["requests"],
                hparams=edit.hparams,
                probes=edit.probes,
                resolved_hparams=record_spec["resolved_hparams"],
                model_version=version,
                checks=report,
                timings=timings,
                scope=edit.scope,
                memory=summary.get("memory"),
                delta=delta,
            )
        return replace(self.get(edit_id), **summary, dry_run=False, delta=delta)

    def _context_now(self) -> EditContext:
        """The edit context with the requests of the weight edits in the model now. Which edits
        is read here, on the event loop where the ledger changes; their specs never change, so
        they are read from the journal only by a method that asks (AlphaEdit's protect_prompts)."""
        active = self.ledger.active_ids

        def edited_requests() -> list[EditRequest]:
            specs = (EditSpec.from_json(self.journal.get(edit_id).spec) for edit_id in active)
            return [request for spec in specs for request in spec.requests]

        return replace(self.context, edited_requests=edited_requests)

    def _compute(
        self, spec: MethodSpec, ctx: EditContext, requests: list[EditRequest], resolved: Any
    ) -> ParamDelta | MemoryPayload:
        try:
            if spec.payload == "memory":
                payload = spec.compute(ctx, self.memory.context(), requests, resolved)
                if not payload.entries:
                    raise ValueError("the edit adds no memory entry")
                return payload
            delta = spec.compute(ctx, requests, resolved)
            self.ledger.check(delta)
            return delta
        finally:
            give_back_free_memory()  # else the heap grows with every edit (editserve.heap)

    async def _commit(
        self,
        edit_id: str,
        edit: EditSpec,
        record: dict,
        result: ParamDelta | MemoryPayload,
        placed: Placed,
    ) -> int:
        def save() -> None:  # flattening copies non-contiguous factors: torch work, off the loop
            tensors = result.tensors if isinstance(result, MemoryPayload) else result.to_tensors()
            self.journal.begin(edit_id, edit.method, edit.kind, record, tensors)

        crash_point("before_payload")
        with self._storage("the edit could not be saved"):
            await in_worker(save)
        crash_point("after_row")

        def apply() -> int:
            self.live.put(edit_id, placed)
            crash_point("during_apply")
            try:
                version = self.journal.mark_applied(edit_id)
            except BaseException:
                self.live.take_back(edit_id)  # the live model back as the journal says
                raise
            self.engine.model_version = version
            return version

        try:
            with self._storage("the edit could not be committed"):
                if (staged := self.live.stage(placed)) is not None:
                    await asyncio.wrap_future(staged)
                return await asyncio.wrap_future(self.live.run(placed.place, edit.method, apply))
        except BaseException:
            if placed.row_delta is not None:  # staged hooks of an edit that never went live
                self.engine.unregister_row_delta(placed.row_delta)
            try:
                self.journal.mark_failed(edit_id)
            except STORAGE_ERRORS as exc:  # left pending: the next start drops it
                log.error("edit %s could not be marked failed: %s", edit_id, exc)
            raise

    @contextmanager
    def _storage(self, what: str) -> Iterator[None]:
        """A full or read-only state folder: refused, saying so (the caller changed nothing)."""
        try:
            yield
        except STORAGE_ERRORS as exc:
            log.error("%s: %s", what, exc)
            raise StorageRefused(
                f"{what}: the state folder {self.journal.state_dir} refused the write ({exc}); "
                "nothing was changed and the server keeps serving. Free space or fix its "
                "permissions, then retry."
            ) from exc

    # -- undo --------------------------------------------------------------------------------------

    async def undo(self, edit_id: str, rebase: bool = False) -> UndoOutcome:
        async with self._lock:
            row = self.journal.get(edit_id)
            if row is None or row.status in ("pending", "failed"):
                raise EditNotFound(f"no edit {edit_id!r}", "id")
            if row.status == "undone":
                raise AlreadyUndone(f"edit {edit_id} was already undone", "id")
            later = [r.id for r in self.journal.list(("applied",)) if r.seq > row.seq]
            # Only weight deltas are recomputed on a rebase: prompt memory does not depend on
            # the weights, and GRACE entries keep their keys (see README, "Order").
            # (a scoped edit's delta is not in the weights either, nor a damaged one's)
            later_params = [r for r in later if self.live.place_of(r) == "weights"]
            place = self.live.place_of(edit_id) or "weights"  # unreplayed: nothing live

            def revert() -> int:
                # The journal first: if it cannot record the undo, nothing changed; a crash
                # after it restarts without the edit, as the journal says.
                version = self.journal.mark_undone(edit_id)
                crash_point("during_undo")
                if self.unreplayed.pop(edit_id, None) is None:  # else never in the live model
                    self.live.take_back(edit_id)
                self.engine.model_version = version
                return version

            t = time.monotonic()
            with self._storage("the undo could not be saved"):
                await asyncio.wrap_future(self.live.run(place, row.method, revert))
            undo_s = time.monotonic() - t
            outcome = RebaseOutcome([])
            if rebase and later_params:
                outcome = await rebase_later(
                    edit_id, later_params, self.ledger, self.engine, self.journal, self._recompute
                )
        return UndoOutcome(
            id=edit_id,
            model_version=self.engine.model_version,
            later_edits=later,
            rebased=outcome.rebased,
            timings={"undo_s": undo_s},
            rebase_error=outcome.error,
        )

    async def _recompute(self, edit_id: str) -> ParamDelta:
        """A weight edit's delta computed again from its journaled request, on the model now."""
        edit = EditSpec.from_json(self.journal.get(edit_id).spec)
        spec = METHODS[edit.method]
        resolved = self.validator.resolve_hparams(spec, edit.hparams, edit.scope)
        delta = await in_worker(self._compute, spec, self._context_now(), edit.requests, resolved)
        assert isinstance(delta, ParamDelta)  # only weight edits are rebased
        return delta

    # -- reading -----------------------------------------------------------------------------------

    def list(self) -> list[EditRecord]:
        return [self._record(row) for row in self.journal.list()]

    def get(self, edit_id: str) -> EditRecord:
        row = self.journal.get(edit_id)
        if row is None or row.status in ("pending", "failed"):
            raise EditNotFound(f"no edit {edit_id!r}", "id")
        return self._record(row)

    def _record(self, row: Any) -> EditRecord:
        not_replayed = self.unreplayed.get(row.id)
        summary = row.summary or {}
        return EditRecord(
            id=row.id,
            method=row.method,
            kind=row.kind,
            status="not_replayed" if not_replayed else row.status,
            error=not_replayed,
            created_at=row.created_at,
            applied_at=row.applied_at,
            undone_at=row.undone_at,
            model_version=row.applied_version,
            requests=row.spec["requests"],
            hparams=row.spec["hparams"],
            resolved_hparams=row.spec.get("resolved_hparams"),
            scope=row.spec.get("scope", "global"),
            checks=summary.get("checks"),
            timings=summary.get("timings"),
            memory=summary.get("memory"),
        )
