"""The live model on transformers, with continuous batching.

One background thread owns the model. Each iteration it prefills the requests its `Scheduler`
admits (batched, right-padded), then runs one decode step for every running request. Requests
join and leave between steps; each owns one row of a `SlotKVCache`, so nothing is recomputed and
nothing is copied per step. Callers on the event loop get a `RequestHandle` to iterate.

Memory is bounded: a request is admitted only when the KV cache can hold its worst case next to
the running ones' (see `SlotKVCache`), and the waiting queue has a length limit (`QueueFull`).
A weight change waits for the batch to drain at most `drain_timeout_s`; then the running requests
are preempted (their cache rows dropped), the change runs, and they resume on the new weights by
prefilling their prompt and the tokens they had generated.

Scoped edits need no drain: a request carries the row deltas it was submitted with
(`editserve.engine.row_deltas`), and every forward adds them to its rows alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from editserve.engine.detokenizer import IncrementalDetokenizer
from editserve.engine.kvcache import SlotKVCache, default_kv_cache_bytes, kv_bytes_per_token
from editserve.engine.limits import RequestLimits
from editserve.engine.request import GenerationChunk, OutputStream, PromptScores, RequestHandle
from editserve.engine.row_deltas import RowDelta, RowDeltaHooks
from editserve.engine.sampling import Sampler, SamplingParams, TokenLogprob, token_logprobs
from editserve.engine.scheduler import RunningRequest, Scheduler
from editserve.modelstore import LoadedModel
from editserve.threads import release_thread_team

if TYPE_CHECKING:
    from editserve.config import Settings

log = logging.getLogger(__name__)

StepObserver = Callable[[int, int], None]  # (batch size, requests waiting), once per decode step


class TransformersEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int = 32,
        max_model_len: int | None = None,
        prefill_token_budget: int = 4096,
        on_step: StepObserver | None = None,
        kv_cache_bytes: int | None = None,
        max_waiting: int = 256,
        drain_timeout_s: float = 10.0,
        default_max_tokens: int = 1024,
        max_tokens_limit: int | None = None,
    ) -> None:
        self.name = loaded.name
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = next(self.model.parameters()).device
        config = self.model.config
        native_len = getattr(config, "max_position_embeddings", None) or config.n_positions
        self.max_model_len = min(max_model_len or native_len, native_len)
        self.max_batch = max_batch
        self.prefill_token_budget = max(prefill_token_budget, 1)
        self.eos_ids = _eos_ids(loaded)
        self.model_version = 0
        self._decoder = self.model.base_model  # everything up to and including the final norm
        self._lm_head = self.model.get_output_embeddings()
        self._row_deltas = RowDeltaHooks(self.model, self._decoder)
        self.kv_bytes_per_token = kv_bytes_per_token(self.model)
        if kv_cache_bytes is None:
            kv_cache_bytes = default_kv_cache_bytes(
                self.kv_bytes_per_token, max_batch, self.max_model_len, self.device
            )
        self.limits = RequestLimits(
            self.max_model_len,
            kv_budget_tokens=max(kv_cache_bytes // self.kv_bytes_per_token, 1),
            max_waiting=max(max_waiting, 1),
            default_max_tokens=max(default_max_tokens, 1),
            max_tokens_limit=max_tokens_limit,
        )
        self.kv_cache_bytes = self.limits.kv_budget_tokens * self.kv_bytes_per_token
        self.drain_timeout_s = drain_timeout_s
        self._cache = SlotKVCache(
            max_batch, self.max_model_len, budget_tokens=self.limits.kv_budget_tokens
        )
        self._on_step = on_step
        self._running: list[RunningRequest] = []  # the batch: index = cache row
        # (change, its future, when it was queued): the drain timeout counts from then
        self._exclusive: deque[tuple[Callable[[], Any], Future, float]] = deque()
        self._between: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        # One condition for both: a queued request and a queued change each wake the loop.
        self._scheduler = Scheduler(self.limits, max_batch, self.prefill_token_budget, self._wake)
        self._stopping = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(
        cls, loaded: LoadedModel, settings: Settings, on_step: StepObserver | None = None
    ) -> TransformersEngine:
        mb = settings.kv_cache_mb
        return cls(
            loaded,
            max_batch=settings.max_batch,
            max_model_len=settings.max_model_len,
            on_step=on_step,
            kv_cache_bytes=None if mb is None else mb << 20,
            max_waiting=settings.max_waiting,
            drain_timeout_s=settings.edit_drain_timeout_s,
            default_max_tokens=settings.default_max_tokens,
            max_tokens_limit=settings.max_tokens_limit,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="editserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self._row_deltas.prune()  # nothing runs now: only registered deltas keep their hooks
        for future in [f for _, f, _ in self._exclusive] + [f for _, f in self._between]:
            future.set_exception(RuntimeError("the engine stopped"))
        self._exclusive.clear()
        self._between.clear()

    def run_exclusive(self, fn: Callable[[], Any]) -> Future:
        """Runs `fn` on the engine thread with no request in flight: the way weights change.

        Requests already running finish on the weights they started with, for at most
        `drain_timeout_s`; requests arriving meanwhile wait and start on the new weights. Past
        the timeout the running requests are preempted: `fn` runs, and they resume on the new
        weights (their handles then report the new `model_version`, and so do their next
        chunks). `fn` may set `model_version`.
        """
        future: Future = Future()
        with self._wake:
            self._exclusive.append((fn, future, time.monotonic()))
            self._wake.notify()
        return future

    def run_between_steps(self, fn: Callable[[], Any]) -> Future:
        """Runs `fn` on the engine thread between two decode steps, before the next admission,
        without draining: for changes that only new requests can see (prompt memory: a running
        request's prompt is fixed). Requests admitted after it get the version `fn` sets."""
        future: Future = Future()
        with self._wake:
            self._between.append((fn, future))
            self._wake.notify()
        return future

    def register_row_delta(self, delta: RowDelta) -> Future:
        """Hooks `delta`'s modules before any request needs it, without draining; they stay
        hooked until `unregister_row_delta` and the last request carrying it is done. Before
        `start` (a replay) it is done at once, on the caller's thread."""
        self._row_deltas.check(delta)
        return self._on_engine_thread(lambda: self._row_deltas.register(delta))

    def unregister_row_delta(self, delta: RowDelta) -> Future:
        """Running and queued requests that carry `delta` keep it."""
        return self._on_engine_thread(lambda: self._row_deltas.unregister(delta))

    def _on_engine_thread(self, fn: Callable[[], Any]) -> Future:
        if self._thread is not None and self._thread.is_alive():
            return self.run_between_steps(fn)
        done: Future = Future()  # nothing runs: the caller owns the model
        done.set_result(fn())
        return done

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
        """Queues a generation whose chunks go to `stream`. The caller checks limits first
        (`check_length`). `still_valid` is asked at admission (see `RequestHandle`); `first`
        puts it at the head of the queue (a stale request rendered again keeps its turn).
        `row_deltas`: the scoped deltas it runs with (ValueError if one does not fit the model).
        Not bounded by `max_waiting`: for the server's own few generations (edit checks);
        clients' calls go through `submit_group`."""
        for delta in row_deltas:
            self._row_deltas.check(delta)
        return self._scheduler.submit(prompt_ids, params, stream, still_valid, first, row_deltas)

    def submit_group(
        self,
        jobs: list[tuple[list[int], SamplingParams]],
        stream: OutputStream,
        still_valid: Callable[[], bool] | None = None,
        first: bool = False,
        row_deltas: Sequence[tuple[RowDelta, ...]] | None = None,
    ) -> list[RequestHandle]:
        """Queues one API call's generations (prompts x n) as a group: admitted in one step,
        all or none, so no exclusive change runs between them and they share one model version
        (the one the call's header reports). At most `max_batch` of them. Raises
        `RequestTooLarge` for a call the KV cache could never hold, `QueueFull` when
        `max_waiting` generations wait. `row_deltas`: one tuple per job (None: none at all)."""
        for delta in {d for deltas in row_deltas or () for d in deltas}:
            self._row_deltas.check(delta)
        return self._scheduler.submit_group(jobs, stream, still_valid, first, row_deltas)

    def completion_budget(self, prompt_tokens: int, requested: int | None) -> int:
        return self.limits.completion_budget(prompt_tokens, requested)

    def check_length(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """A person-readable reason the request can't fit the context window, the max_tokens
        limit or the KV-cache budget, or None."""
        return self.limits.check_length(prompt_tokens, max_tokens)

    @property
    def num_waiting(self) -> int:
        return self._scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (
                        self._stopping
                        or self._scheduler.num_waiting
                        or self._running
                        or self._exclusive
                        or self._between
                    ):
                        self._cache.shrink()  # idle: give grown cache memory back
                        self._row_deltas.prune()  # and unhook what no live delta needs
                        release_thread_team()  # and the OpenMP team (editserve.threads)
                        self._wake.wait()
                    if self._stopping:
                        return
                    while self._between:  # before admitting: newcomers see the change
                        self._run_exclusive(*self._between.popleft())
                    if self._exclusive and self._running:
                        waited = time.monotonic() - self._exclusive[0][2]
                        if waited >= self.drain_timeout_s:
                            self._scheduler.preempt(self._running, waited)
                            self._running.clear()  # their cache rows are free for others
                    operation = (
                        self._exclusive.popleft() if self._exclusive and not self._running else None
                    )
                    # While a weight change is pending, nobody joins: the batch drains first.
                    # Preempted requests resume alone, in one step (they fit: they ran together).
                    newcomers: list[RunningRequest] = []
                    if not (self._exclusive or operation):
                        version = self.model_version
                        newcomers = self._scheduler.resume(version) or [
                            self._start(h) for h in self._scheduler.admit(self._running, version)
                        ]
                if operation is not None:
                    self._run_exclusive(*operation[:2])
                    continue
                try:
                    self._drop_aborted()
                    for batch in self._scheduler.prefill_batches(newcomers):
                        self._prefill(batch)
                    if self._running:
                        self._decode_step()
                except Exception as exc:  # a failed step fails its requests, not the server
                    log.exception("engine step failed")
                    failed = {id(s.handle): s.handle for s in [*newcomers, *self._running]}
                    for handle in failed.values():
                        handle.push(exc)
                    self._running.clear()

    @staticmethod
    def _run_exclusive(fn: Callable[[], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            with torch.inference_mode(False):
                future.set_result(fn())
        except BaseException as exc:  # the caller gets it; the engine goes on serving
            future.set_exception(exc)

    def _start(self, handle: RequestHandle) -> RunningRequest:
        detokenizer = IncrementalDetokenizer(self.tokenizer, handle.params.stop)
        worst = self.limits.worst_case(len(handle.prompt_ids), handle.params.max_tokens)
        return RunningRequest(handle, Sampler(handle.params), detokenizer, worst)

    def _drop_aborted(self) -> None:
        for row in reversed(range(len(self._running))):
            if self._running[row].handle.aborted:
                self._remove(row)

    def _prefill(self, states: list[RunningRequest]) -> None:
        """Prefills new requests' prompts, and resumed ones' prompts + generated tokens."""
        handles = [s.handle for s in states]
        sequences = [s.handle.prompt_ids + s.tokens for s in states]
        lengths = [len(ids) for ids in sequences]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor(
            [ids + [pad] * (width - len(ids)) for ids in sequences], device=self.device
        )
        positions = torch.arange(width, device=self.device).expand(len(handles), width)
        # Right padding under a causal mask: real tokens never see the pads after them.
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        first_row = len(self._running)
        in_use = max((r.length + 1 for r in self._running), default=0)
        self._cache.prepare_prefill(list(range(first_row, first_row + len(handles))), width, in_use)
        with self._row_deltas.for_rows([h.row_deltas for h in handles]):
            hidden = self._decoder(
                input_ids=input_ids,
                attention_mask=causal.expand(len(handles), 1, width, width),
                position_ids=positions,
                cache=self._cache,
                use_cache=True,
            ).last_hidden_state
        for state, n in zip(states, lengths, strict=True):
            state.length = n
            self._running.append(state)
        # In reverse, so that retiring a request never moves a row still to visit.
        for i in reversed(range(len(handles))):
            handle, n = handles[i], lengths[i]
            # A resumed request scored its prompt before; its logits continue from its tokens.
            wants_scores = handle.params.prompt_logprobs is not None and not states[i].tokens
            rows = hidden[i, :n] if wants_scores else hidden[i, n - 1 : n]
            logits = self._lm_head(rows).float()
            if wants_scores:
                handle.prompt_scores = _prompt_scores(
                    logits[:-1], input_ids[i, 1:n], handle.params.prompt_logprobs or 0
                )
            if handle.params.max_tokens == 0:  # scoring only (completions echo)
                handle.push(GenerationChunk(text="", token_ids=[], finish_reason="length"))
                self._remove(first_row + i)
            else:
                self._accept(first_row + i, logits[-1])

    def _decode_step(self) -> None:
        batch = self._running
        lengths = [r.length for r in batch]
        if self._on_step is not None:
            self._on_step(len(batch), self._scheduler.num_queued)
        self._cache.prepare_decode(lengths)
        width = max(lengths) + 1
        lengths_t = torch.tensor(lengths, device=self.device)
        visible = torch.arange(width, device=self.device)[None, :] <= lengths_t[:, None]
        with self._row_deltas.for_rows([r.handle.row_deltas for r in batch], whole_batch=True):
            hidden = self._decoder(
                input_ids=torch.tensor([[r.next_input] for r in batch], device=self.device),
                attention_mask=visible[:, None, None, :],
                position_ids=lengths_t[:, None],
                cache=self._cache,
                use_cache=True,
            ).last_hidden_state
        logits = self._lm_head(hidden[:, 0]).float()
        for row in range(len(batch)):
            batch[row].length += 1
        # Accept in reverse so that removing a finished row never shifts a row still to visit.
        for row in reversed(range(len(batch))):
            self._accept(row, logits[row])

    def _accept(self, row: int, logits: torch.Tensor) -> None:
        """Samples the next token of `row`, streams it, and retires the request when done."""
        state = self._running[row]
        params = state.handle.params
        token = state.sampler.sample(logits)
        state.tokens.append(token)
        state.next_input = token
        logprobs = None
        if params.logprobs is not None:
            logprobs = token_logprobs(logits[None], torch.tensor([token]), params.logprobs)
        finish = None
        if token in self.eos_ids and not params.ignore_eos:
            finish = "stop"
        else:
            state.detokenizer.add(token)
            if state.detokenizer.stopped:
                finish = "stop"
            elif len(state.tokens) >= params.max_tokens or state.length + 1 >= self.max_model_len:
                finish = "length"
        text = state.detokenizer.release(final=finish is not None)
        chunk = GenerationChunk(text, [token], logprobs, finish, state.handle.model_version)
        state.handle.push(chunk)
        if finish is not None:
            self._remove(row)

    def _remove(self, row: int) -> None:
        """Retires `row`, moving the last row into its place so rows stay 0..B-1."""
        last = len(self._running) - 1
        if row != last:
            self._cache.move_row(last, row, self._running[last].length)
            self._running[row] = self._running[last]
        self._running.pop()


def _prompt_scores(logits: torch.Tensor, targets: torch.Tensor, top_k: int) -> PromptScores:
    """logits[i] predicts targets[i] (= prompt token i+1)."""
    scored = token_logprobs(logits, targets, top_k) if targets.numel() else []
    return PromptScores(logprobs=scored)


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (loaded.tokenizer.eos_token_id, loaded.model.generation_config.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return frozenset(ids)


__all__ = ["TransformersEngine", "SamplingParams", "TokenLogprob"]
