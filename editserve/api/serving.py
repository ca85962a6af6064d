"""The OpenAI-compatible generation service: requests in, engine generations, responses out.

Routes stay thin: each calls one method here. This layer turns prompts into tokens (chats through
`editserve.prompts`, the renderer edits are made and checked with), checks them against the
context window, submits one generation per prompt and choice, and shapes the answer (JSON, or SSE
chunks ending with `data: [DONE]`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from editserve.api import wire
from editserve.api.errors import APIError, bad_request
from editserve.api.offsets import OffsetTracker, PromptText, generated_offsets
from editserve.api.schemas import ChatCompletionRequest, CompletionRequest
from editserve.edits.scoped import ScopedEdits
from editserve.engine.request import GenerationResult, OutputStream
from editserve.engine.row_deltas import RowDelta
from editserve.engine.sampling import SamplingParams, TokenLogprob
from editserve.engine.transformers_engine import TransformersEngine
from editserve.metrics import ServerMetrics
from editserve.prompts import PromptError, PromptRenderer
from editserve.threads import in_worker

# The memory edits (IKE, ICE, SERAC) whose facts went into a chat prompt: comma-separated ids.
MEMORY_HEADER = "x-editserve-memory-edits"
# The scoped edits whose deltas shaped the answer (the request was in their scope): ids.
SCOPED_HEADER = "x-editserve-scoped-edits"

log = logging.getLogger(__name__)


class OpenAIServing:
    def __init__(
        self,
        engine: TransformersEngine,
        metrics: ServerMetrics,
        model_name: str,
        prompts: PromptRenderer | None = None,
        scoped: ScopedEdits | None = None,
    ):
        self.engine = engine
        # The edit service's renderer: chats are fed what edits are checked on.
        self.prompts = prompts or PromptRenderer(engine.tokenizer, engine.max_model_len)
        self.memory = self.prompts.memory  # memory edits (IKE, SERAC) condition chat prompts
        self.scoped = scoped  # scoped weight edits: some requests run with their deltas
        self.tokenizer = engine.tokenizer
        self.metrics = metrics
        self.model_name = model_name
        self.created = int(time.time())

    # -- /v1/models ------------------------------------------------------------------------------

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "editserve",
            "max_model_len": self.engine.max_model_len,
        }

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    # -- /v1/chat/completions ----------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, http: Request) -> Response:
        self.check_model(req.model)
        started = time.monotonic()
        retry = False
        while True:
            # Memory edits change prompts: if one lands between rendering and admission (it
            # bumps the version the request is admitted at), the engine hands the request back
            # unrun and it is rendered again on the new memory, keeping its place in the queue.
            still_valid = None
            if self.memory is not None or self.scoped is not None:
                still_valid = partial(self._edits_are_at, self._edit_generations())
            prompt, memory_header = await self._render_chat(req)
            users = [m["content"] for m in req.template_messages() if m["role"] == "user"]
            (row_deltas,), scoped_header = await self._scope_decision([users])
            max_tokens = self._max_tokens(req.requested_max_tokens(), len(prompt))
            stream = self._submit(
                [prompt] * req.n,
                lambda i, budget=max_tokens: req.sampling_params(budget, i, req.logprobs_k()),
                still_valid,
                first=retry,
                row_deltas=[row_deltas] * req.n,
            )
            if still_valid is None:
                break
            await stream.admitted()
            if not any(h.stale for h in stream.handles):
                break
            stream.abort()  # n > 1: choices admitted before the change must not run alone
            retry = True
        meta = wire.meta("chatcmpl", "chat.completion.chunk", self.model_name)
        if req.stream:
            await stream.admitted()  # the version header must name the weights it runs on
            events = self._chat_events(stream, meta, len(prompt), req.include_usage(), started)
            return wire.sse(events, stream, wire.version(stream) | memory_header | scoped_header)
        results = await self._collect(http, stream)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": self._chat_logprobs(r.logprobs),
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        body = {**meta, "object": "chat.completion", "choices": choices}
        body["usage"] = self._usage(len(prompt), results)
        headers = wire.version(stream) | memory_header | scoped_header
        return JSONResponse(body, headers=headers)

    async def _render_chat(self, req: ChatCompletionRequest) -> tuple[list[int], dict[str, str]]:
        """The prompt's token ids, and the memory header naming the edits it holds (if any)."""
        messages = req.template_messages()
        try:
            self.prompts.require_template()
            used = await self._memory_lookup(messages)
            served = self.prompts.conditioned(messages, used, req.requested_max_tokens() or 1)
        except PromptError as exc:
            raise bad_request(str(exc), param="messages") from exc
        held = served.memory_edits
        return served.ids, {MEMORY_HEADER: ",".join(held)} if held else {}

    async def _scope_decision(
        self, conversations: list[list[str]]
    ) -> tuple[list[tuple[RowDelta, ...]], dict[str, str]]:
        """Per conversation (its user messages; a completion's prompt text), the row deltas of
        the scoped edits whose scope it falls in, decided off the event loop (the sentence
        encoder runs torch); and the header naming every edit that applied."""
        if self.scoped is None or not len(self.scoped):
            return [() for _ in conversations], {}
        scoped = self.scoped
        started = time.monotonic()
        decided = await in_worker(lambda: [scoped.decide(c) for c in conversations])
        self.metrics.scope_decision.observe(time.monotonic() - started)
        names = list(dict.fromkeys(n for found, _ in decided for n in found))
        return [deltas for _, deltas in decided], {SCOPED_HEADER: ",".join(names)} if names else {}

    async def _memory_lookup(self, messages: list[dict[str, str]]) -> list[dict[str, Any]]:
        """The memory entries relevant to a chat, looked up off the event loop (the sentence
        encoder runs torch), and only when some prompt-side entry exists."""
        if not self.prompts.retrieves():
            return []
        started = time.monotonic()
        used = await in_worker(self.prompts.retrieve, messages)
        self.metrics.memory_lookup.observe(time.monotonic() - started)
        if used:
            fired = [(u["edit_id"], u["store"], u["scope"], round(u["score"], 3)) for u in used]
            log.debug("memory entries in the prompt (edit, store, scope, score): %s", fired)
        return used

    async def _chat_events(
        self, stream: OutputStream, meta: dict, prompt_tokens: int, usage: bool, started: float
    ) -> AsyncIterator[dict]:
        extra = {"usage": None} if usage else {}
        for handle in stream.handles:
            delta = {"role": "assistant", "content": ""}
            yield {
                **meta,
                **wire.fingerprint(handle.model_version),
                "choices": [wire.chunk_choice(handle.index, delta)],
                **extra,
            }
        results = [GenerationResult() for _ in stream.handles]
        async for index, chunk in self._timed(stream, started):
            results[index].add(chunk)
            delta = {"content": chunk.text} if chunk.text else {}
            if not delta and chunk.finish_reason is None and chunk.logprobs is None:
                continue  # text held back (a possible stop string, a partial character)
            logprobs = self._chat_logprobs(chunk.logprobs)
            choice = wire.chunk_choice(index, delta, chunk.finish_reason, logprobs)
            yield {**meta, **wire.fingerprint(chunk.model_version), "choices": [choice], **extra}
        if usage:
            yield {**meta, "choices": [], "usage": self._usage(prompt_tokens, results)}

    def _chat_logprobs(self, logprobs: list[TokenLogprob] | None) -> dict | None:
        if logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self.tokenizer.decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                for lp in logprobs
            ]
        }

    # -- /v1/completions ---------------------------------------------------------------------------

    async def completion(self, req: CompletionRequest, http: Request) -> Response:
        self.check_model(req.model)
        prompts = self._tokenize_prompts(req.prompt)
        if req.max_tokens == 0 and not req.echo:
            raise bad_request(
                "max_tokens must be at least 1 (0 is allowed only with echo, to score the prompt)",
                param="max_tokens",
            )
        if req.echo and req.stream:
            raise bad_request("echo is not supported with stream", param="echo")
        budgets = [self._max_tokens(req.max_tokens, len(p.ids)) for p in prompts]
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        per_choice = [p.ids for p in prompts for _ in range(req.n)]
        # Scoped edits: each prompt decided on its text (a prompt of token ids reaches none).
        still_valid = None
        if self.scoped is not None:
            still_valid = partial(self._edits_are_at, self._edit_generations())
        texts = [[p.text] if p.text else [] for p in prompts]
        decided, scoped_header = await self._scope_decision(texts)
        stream = self._submit(
            per_choice,
            lambda i: req.sampling_params(budgets[i // req.n], i, req.logprobs, prompt_logprobs),
            still_valid,
            row_deltas=[d for d in decided for _ in range(req.n)],
        )
        if still_valid is not None:
            await stream.admitted()
            if any(h.stale for h in stream.handles):  # an edit landed meanwhile: once more
                stream.abort()
                return await self.completion(req, http)
        prompt_tokens = sum(len(p.ids) for p in prompts)
        meta = wire.meta("cmpl", "text_completion", self.model_name)
        if req.stream:
            started = time.monotonic()
            await stream.admitted()
            events = self._completion_events(stream, meta, prompt_tokens, req, started)
            return wire.sse(events, stream, wire.version(stream) | scoped_header)
        results = await self._collect(http, stream)
        choices = []
        for handle, result in zip(stream.handles, results, strict=True):
            text, logprobs, offsets = result.text, None, []
            if req.echo:
                echoed, offsets = prompts[handle.index // req.n].echo(self.tokenizer)
                text = echoed + text
            if req.logprobs is not None:
                scored = handle.prompt_scores.logprobs if handle.prompt_scores else []
                generated = result.logprobs or []
                ids, start = [lp.token_id for lp in generated], len(text) - len(result.text)
                offsets = offsets + generated_offsets(self.tokenizer, ids, result.text, start)
                logprobs = self._completion_logprobs(
                    handle.prompt_ids if req.echo else [], scored, generated, offsets
                )
            choices.append(
                {
                    "index": handle.index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": result.finish_reason,
                }
            )
        body = {**meta, "choices": choices, "usage": self._usage(prompt_tokens, results)}
        return JSONResponse(body, headers=wire.version(stream) | scoped_header)

    def _tokenize_prompts(self, prompt: str | list) -> list[PromptText]:
        if isinstance(prompt, str):
            prompts = [PromptText.encode(self.tokenizer, prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [PromptText.encode(self.tokenizer, p) for p in prompt]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [PromptText(list(prompt))]
        else:
            prompts = [PromptText(list(p)) for p in prompt]
        vocab = len(self.tokenizer)
        for ids in (p.ids for p in prompts):
            if not ids:
                raise bad_request("a prompt is empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise bad_request(f"token ids must lie in 0..{vocab - 1}", param="prompt")
        return prompts

    async def _completion_events(
        self,
        stream: OutputStream,
        meta: dict,
        prompt_tokens: int,
        req: CompletionRequest,
        started: float,
    ) -> AsyncIterator[dict]:
        extra = {"usage": None} if req.include_usage() else {}
        results = [GenerationResult() for _ in stream.handles]
        # Offsets run on across a choice's chunks (into its whole text), as in one answer.
        trackers = [OffsetTracker(self.tokenizer, skip_special_tokens=True) for _ in results]
        async for index, chunk in self._timed(stream, started):
            results[index].add(chunk)
            if not chunk.text and chunk.finish_reason is None and chunk.logprobs is None:
                continue
            logprobs = None
            if chunk.logprobs is not None:
                offsets = [trackers[index].add(lp.token_id) for lp in chunk.logprobs]
                logprobs = self._completion_logprobs([], [], chunk.logprobs, offsets)
            choice = {
                "index": index,
                "text": chunk.text,
                "logprobs": logprobs,
                "finish_reason": chunk.finish_reason,
            }
            yield {**meta, **wire.fingerprint(chunk.model_version), "choices": [choice], **extra}
        if req.include_usage():
            yield {**meta, "choices": [], "usage": self._usage(prompt_tokens, results)}

    def _completion_logprobs(
        self,
        prompt_ids: list[int],
        prompt_scored: list[TokenLogprob],
        generated: list[TokenLogprob],
        offsets: list[int],
    ) -> dict:
        """The legacy completions shape. With echo, the first prompt token has no logprob.
        `offsets`: each token's `text_offset` (editserve.api.offsets)."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        if prompt_ids:
            tokens.append(self.tokenizer.decode([prompt_ids[0]]))
            token_logprobs.append(None)
            top.append(None)
        for lp in [*prompt_scored, *generated]:
            tokens.append(self.tokenizer.decode([lp.token_id]))
            token_logprobs.append(lp.logprob)
            top.append({self.tokenizer.decode([t]): v for t, v in lp.top})
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    # -- shared ----------------------------------------------------------------------------------

    def _max_tokens(self, requested: int | None, prompt_tokens: int) -> int:
        """The completion budget: as asked, or what the context window leaves."""
        limit = self.engine.max_model_len
        if prompt_tokens >= limit:
            raise bad_request(
                f"the prompt has {prompt_tokens} tokens, more than this model's maximum context "
                f"length of {limit} tokens allows (leave room for at least one generated token)",
                param="messages",
                code="context_length_exceeded",
            )
        budget = self.engine.completion_budget(prompt_tokens, requested)  # capped by default
        problem = self.engine.check_length(prompt_tokens, budget)
        if problem:
            raise bad_request(problem, param="max_tokens", code="context_length_exceeded")
        return budget

    def _edit_generations(self) -> tuple[int | None, int | None]:
        memory, scoped = self.memory, self.scoped
        return (memory.generation if memory else None, scoped.generation if scoped else None)

    def _edits_are_at(self, generations: tuple[int | None, int | None]) -> bool:
        """Prompt memory and scoped edits as when the request was rendered and decided."""
        return self._edit_generations() == generations

    def _submit(
        self,
        prompts: list[list[int]],
        params_for: Callable[[int], SamplingParams],
        still_valid: Callable[[], bool] | None = None,
        first: bool = False,
        row_deltas: list[tuple[RowDelta, ...]] | None = None,
    ) -> OutputStream:
        if len(prompts) > self.engine.max_batch:
            raise bad_request(
                f"this call asks for {len(prompts)} generations (prompts x n); this server "
                f"runs at most {self.engine.max_batch} at once (EDITSERVE_MAX_BATCH)",
                param="n",
            )
        stream = OutputStream()
        # Admitted together: no edit lands between two choices of one call (one version).
        jobs = [(prompt, params_for(i)) for i, prompt in enumerate(prompts)]
        per_job = row_deltas if row_deltas and any(row_deltas) else None
        self.engine.submit_group(jobs, stream, still_valid, first, per_job)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        return stream

    async def _timed(self, stream: OutputStream, started: float) -> AsyncIterator:
        """The stream's chunks, recording time to first token and token counts."""
        seen: set[int] = set()
        async for index, chunk in stream:
            if index not in seen:
                seen.add(index)
                self.metrics.time_to_first_token.observe(time.monotonic() - started)
            self.metrics.generation_tokens.inc(len(chunk.token_ids))
            yield index, chunk

    async def _collect(self, http: Request, stream: OutputStream) -> list[GenerationResult]:
        started = time.monotonic()

        async def gather() -> list[GenerationResult]:
            results = [GenerationResult() for _ in stream.handles]
            async for index, chunk in self._timed(stream, started):
                results[index].add(chunk)
            return results

        try:
            return await wire.until_disconnect(http, gather())
        finally:
            stream.abort()  # no-op for finished generations; frees the rows of abandoned ones

    @staticmethod
    def _usage(prompt_tokens: int, results: list[GenerationResult]) -> dict[str, int]:
        completion = sum(len(r.token_ids) for r in results)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
