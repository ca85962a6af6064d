"""The live model on transformers, with continuous batching.

One background thread owns the model. Each iteration it admits waiting requests (one batched
prefill, right-padded), then runs one decode step for every running request. Requests join and
leave between steps; each owns one row of a `SlotKVCache`, so nothing is recomputed and nothing
is copied per step. Callers on the event loop get a `RequestHandle` to iterate.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from editserve.engine.detokenizer import IncrementalDetokenizer
from editserve.engine.kvcache import SlotKVCache
from editserve.engine.request import GenerationChunk, OutputStream, PromptScores, RequestHandle
from editserve.engine.sampling import Sampler, SamplingParams, TokenLogprob, token_logprobs
from editserve.modelstore import LoadedModel
from editserve.threads import release_thread_team

log = logging.getLogger(__name__)

StepObserver = Callable[[int, int], None]  # (batch size, requests waiting), once per decode step


@dataclass
class _Running:
    """Engine-side state of one request in the batch; its index in the list is its cache row."""

    handle: RequestHandle
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    length: int  # tokens in the cache
    next_input: int  # the last sampled token, fed at the next step
    generated: int = 0


class TransformersEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int = 32,
        max_model_len: int | None = None,
        prefill_token_budget: int = 4096,
        on_step: StepObserver | None = None,
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
        self._cache = SlotKVCache(max_batch, self.max_model_len)
        self._on_step = on_step
        self._waiting: deque[RequestHandle] = deque()
        self._running: list[_Running] = []
        self._exclusive: deque[tuple[Callable[[], Any], Future]] = deque()
        self._between: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

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
        for _, future in (*self._exclusive, *self._between):
            future.set_exception(RuntimeError("the engine stopped"))
        self._exclusive.clear()
        self._between.clear()

    def run_exclusive(self, fn: Callable[[], Any]) -> Future:
        """Runs `fn` on the engine thread with no request in flight: the way weights change.

        Requests already running finish on the weights they started with (bounded by their
        max_tokens); requests arriving meanwhile wait and start on the new weights. So no answer
        ever mixes two versions of the model. `fn` may set `model_version`.
        """
        future: Future = Future()
        with self._wake:
            self._exclusive.append((fn, future))
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

    # -- called from the event loop ----------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stream: OutputStream,
        still_valid: Callable[[], bool] | None = None,
        first: bool = False,
    ) -> RequestHandle:
        """Queues a generation whose chunks go to `stream`. The caller checks limits first
        (`check_length`). `still_valid` is asked at admission (see `RequestHandle`); `first`
        puts it at the head of the queue (a stale request rendered again keeps its turn)."""
        handle = RequestHandle(prompt_ids, params, stream, still_valid)
        with self._wake:
            if first:
                self._waiting.appendleft(handle)
            else:
                self._waiting.append(handle)
            self._wake.notify()
        return handle

    def check_length(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """A person-readable reason the request can't fit the context window, or None."""
        if prompt_tokens == 0:
            return "the prompt is empty"
        if prompt_tokens + max_tokens > self.max_model_len:
            return (
                f"this model's maximum context length is {self.max_model_len} tokens; the request "
                f"asks for {prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, "
                f"{max_tokens} to generate)"
            )
        return None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

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
                        or self._waiting
                        or self._running
                        or self._exclusive
                        or self._between
                    ):
                        self._cache.shrink()  # idle: give grown cache memory back
                        release_thread_team()  # and the OpenMP team (editserve.threads)
                        self._wake.wait()
                    if self._stopping:
                        return
                    while self._between:  # before admitting: newcomers see the change
                        self._run_exclusive(*self._between.popleft())
                    operation = (
                        self._exclusive.popleft() if self._exclusive and not self._running else None
                    )
                    # While a weight change is pending, nobody joins: the batch drains first.
                    newcomers = [] if self._exclusive or operation else self._admit()
                if operation is not None:
                    self._run_exclusive(*operation)
                    continue
                try:
                    self._drop_aborted()
                    if newcomers:
                        self._prefill(newcomers)
                    if self._running:
                        self._decode_step()
                except Exception as exc:  # a failed step fails its requests, not the server
                    log.exception("engine step failed")
                    for handle in newcomers + [r.handle for r in self._running]:
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

    def _admit(self) -> list[RequestHandle]:
        """Takes waiting requests while batch rows and the prefill token budget allow."""
        admitted: list[RequestHandle] = []
        budget = self.prefill_token_budget
        while self._waiting and len(self._running) + len(admitted) < self.max_batch:
            handle = self._waiting[0]
            if handle.aborted:
                self._waiting.popleft()
                continue
            if handle.still_valid is not None and not handle.still_valid():
                self._waiting.popleft()  # rendered on an older edit memory: not run
                handle.stale = True
                handle.stream.mark_admitted()
                continue
            if admitted and len(handle.prompt_ids) > budget:
                break
            budget -= len(handle.prompt_ids)
            admitted.append(self._waiting.popleft())
            handle.model_version = self.model_version
            handle.stream.mark_admitted()
        return admitted

    def _drop_aborted(self) -> None:
        for row in reversed(range(len(self._running))):
            if self._running[row].handle.aborted:
                self._remove(row)

    def _prefill(self, handles: list[RequestHandle]) -> None:
        lengths = [len(h.prompt_ids) for h in handles]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor(
            [h.prompt_ids + [pad] * (width - len(h.prompt_ids)) for h in handles],
            device=self.device,
        )
        positions = torch.arange(width, device=self.device).expand(len(handles), width)
        # Right padding under a causal mask: real tokens never see the pads after them.
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        first_row = len(self._running)
        self._cache.prepare_prefill(list(range(first_row, first_row + len(handles))), width)
        hidden = self._decoder(
            input_ids=input_ids,
            attention_mask=causal.expand(len(handles), 1, width, width),
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
        ).last_hidden_state
        for i, handle in enumerate(handles):
            self._running.append(
                _Running(
                    handle=handle,
                    sampler=Sampler(handle.params),
                    detokenizer=IncrementalDetokenizer(self.tokenizer, handle.params.stop),
                    length=lengths[i],
                    next_input=-1,
                )
            )
        # In reverse, so that retiring a request never moves a row still to visit.
        for i in reversed(range(len(handles))):
            handle, n = handles[i], lengths[i]
            wants_scores = handle.params.prompt_logprobs is not None
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
            self._on_step(len(batch), len(self._waiting))
        self._cache.prepare_decode(lengths)
        width = max(lengths) + 1
        lengths_t = torch.tensor(lengths, device=self.device)
        visible = torch.arange(width, device=self.device)[None, :] <= lengths_t[:, None]
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
        state.generated += 1
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
            elif state.generated >= params.max_tokens or state.length + 1 >= self.max_model_len:
                finish = "length"
        text = state.detokenizer.release(final=finish is not None)
        state.handle.push(GenerationChunk(text, [token], logprobs, finish))
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
