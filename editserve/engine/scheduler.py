"""Who joins the engine's batch, and when: the waiting queue, admission and preemption.

The engine (transformers_engine.py) runs the model; this decides which requests it runs. Calls
queue here from the event loop; between two steps the engine thread asks for the requests to
prefill: preempted ones first, then waiting ones while batch rows, the prefill token budget and
the KV-cache budget allow. A group (one API call's generations) is admitted whole or waits whole.

Not a lock of its own: it shares the engine's condition, so a queued request wakes the engine
thread, and the engine thread calls `admit`, `preempt` and `resume` holding it.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from editserve.engine.detokenizer import IncrementalDetokenizer
from editserve.engine.limits import RequestLimits, RequestTooLarge
from editserve.engine.request import OutputStream, RequestHandle
from editserve.engine.row_deltas import RowDelta
from editserve.engine.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class RunningRequest:
    """Engine-side state of one admitted request; while in the batch, its index in the list is
    its cache row. A preempted request keeps it (sampler, detokenizer, tokens) to resume."""

    handle: RequestHandle
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    worst: int  # cache columns it may need (prompt + max_tokens): what admission reserves
    length: int = 0  # tokens in the cache
    next_input: int = -1  # the last sampled token, fed at the next step
    tokens: list[int] = field(default_factory=list)  # generated so far


class Scheduler:
    def __init__(
        self,
        limits: RequestLimits,
        max_batch: int,
        prefill_token_budget: int,
        wake: threading.Condition,
    ) -> None:
        self.limits = limits
        self.max_batch = max_batch
        self.prefill_token_budget = prefill_token_budget
        self._wake = wake  # the engine's: guards the queues and wakes its thread
        self._preempted: deque[RunningRequest] = deque()  # resumed before anything waiting
        self._waiting: deque[RequestHandle] = deque()
        # A group's first handle id -> its size: generations admitted together (submit_group).
        self._groups: dict[str, int] = {}

    # -- called from the event loop ----------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stream: OutputStream,
        still_valid: Callable[[], bool] | None = None,
        first: bool = False,
        row_deltas: tuple[RowDelta, ...] = (),
    ) -> RequestHandle:
        """Queues one generation, unbounded by `max_waiting` (see `TransformersEngine.submit`)."""
        handle = RequestHandle(prompt_ids, params, stream, still_valid, row_deltas)
        with self._wake:
            if first:
                self._waiting.appendleft(handle)
            else:
                self._waiting.append(handle)
            self._wake.notify()
        return handle

    def submit_group(
        self,
        jobs: list[tuple[list[int], SamplingParams]],
        stream: OutputStream,
        still_valid: Callable[[], bool] | None = None,
        first: bool = False,
        row_deltas: Sequence[tuple[RowDelta, ...]] | None = None,
    ) -> list[RequestHandle]:
        """Queues one call's generations as a group (see `TransformersEngine.submit_group`)."""
        if not 1 <= len(jobs) <= self.max_batch:
            raise ValueError(f"a group holds 1 to {self.max_batch} generations, not {len(jobs)}")
        per_job = [()] * len(jobs) if row_deltas is None else list(row_deltas)
        if len(per_job) != len(jobs):
            raise ValueError(f"{len(per_job)} row-delta tuples for {len(jobs)} generations")
        self._check_room(jobs, first)
        handles = [
            RequestHandle(ids, params, stream, still_valid, deltas)
            for (ids, params), deltas in zip(jobs, per_job, strict=True)
        ]
        with self._wake:
            if len(handles) > 1:
                self._groups[handles[0].request_id] = len(handles)
            if first:
                self._waiting.extendleft(reversed(handles))
            else:
                self._waiting.extend(handles)
            self._wake.notify()
        return handles

    def _check_room(self, jobs: list[tuple[list[int], SamplingParams]], first: bool) -> None:
        with self._wake:
            waiting = len(self._waiting)
        self.limits.check_call([(len(ids), p.max_tokens) for ids, p in jobs], waiting, first)

    @property
    def num_waiting(self) -> int:
        """Queued and preempted requests: everything that will want a batch row."""
        return len(self._waiting) + len(self._preempted)

    @property
    def num_queued(self) -> int:
        """The waiting queue alone (what the engine's step observer is told)."""
        return len(self._waiting)

    # -- called from the engine thread, holding the engine's condition -------------------------

    def admit(self, running: list[RunningRequest], model_version: int) -> list[RequestHandle]:
        """Takes waiting requests while batch rows and the prefill token budget allow, next to
        `running`, and stamps them with `model_version`. A group (`submit_group`) is taken whole
        or waits whole: a pending weight change stops admission, so a group that does not fit
        yet starts after the change, every member on the new weights."""
        admitted: list[RequestHandle] = []
        budget = self.prefill_token_budget
        columns = max((r.worst for r in running), default=0)  # the KV rectangle's width
        while self._waiting and len(running) + len(admitted) < self.max_batch:
            handle = self._waiting[0]
            if handle.aborted:
                self._waiting.popleft()
                self._groups.pop(handle.request_id, None)  # its call aborted every member
                continue
            size = self._groups.get(handle.request_id, 1)
            group = list(itertools.islice(self._waiting, size))
            if handle.still_valid is not None and not handle.still_valid():
                for member in self._take(size):  # rendered on an older edit memory: not run
                    member.stale = True
                    member.stream.mark_admitted()
                continue
            tokens = sum(len(h.prompt_ids) for h in group)
            if len(running) + len(admitted) + size > self.max_batch:
                break
            if admitted and tokens > budget:
                break
            # Every admitted request must be able to reach its worst case within the budget.
            worst = max(
                self.limits.worst_case(len(h.prompt_ids), h.params.max_tokens) for h in group
            )
            rows = len(running) + len(admitted) + size
            if rows * max(columns, worst) > self.limits.kv_budget_tokens:
                if running or admitted:
                    break  # waits until running requests leave room
                for member in self._take(size):  # never fits: its caller skipped check_length
                    member.stream.mark_admitted()
                    member.push(RequestTooLarge(f"{worst} tokens exceed the KV-cache budget"))
                continue
            columns = max(columns, worst)
            budget -= tokens
            for member in self._take(size):
                admitted.append(member)
                member.model_version = model_version
                member.stream.mark_admitted()
        return admitted

    def _take(self, size: int) -> list[RequestHandle]:
        """Pops the head of the queue: one request, or the `size` members of its group."""
        self._groups.pop(self._waiting[0].request_id, None)
        return [self._waiting.popleft() for _ in range(size)]

    def preempt(self, running: list[RunningRequest], waited: float) -> None:
        """Keeps the batch's requests, in their order, to resume before anything else is
        admitted; the engine drops their cache rows so a pending weight change can run now."""
        log.warning(
            "a weight change waited %.1f s for %d running request(s) "
            "(EDITSERVE_EDIT_DRAIN_TIMEOUT_S): preempted, they resume on the new weights",
            waited,
            len(running),
        )
        self._preempted.extend(running)

    def resume(self, model_version: int) -> list[RunningRequest]:
        """Every preempted request still wanted, on the current weights and version."""
        resumed = [s for s in self._preempted if not s.handle.aborted]
        self._preempted.clear()
        for state in resumed:
            state.handle.model_version = model_version
            state.handle.preemptions += 1
        return resumed

    def prefill_batches(self, states: list[RunningRequest]) -> list[list[RunningRequest]]:
        """One admission in prefills of at most the prefill token budget (a longer prompt goes
        alone): a group admitted whole still prefills in bounded memory, all within one engine
        step. A resumed request's prompt includes the tokens it had generated."""
        batches: list[list[RunningRequest]] = []
        tokens = 0
        for state in states:
            size = len(state.handle.prompt_ids) + len(state.tokens)
            if not batches or tokens + size > self.prefill_token_budget:
                batches.append([])
                tokens = 0
            batches[-1].append(state)
            tokens += size
        return batches


__all__ = ["RunningRequest", "Scheduler"]
