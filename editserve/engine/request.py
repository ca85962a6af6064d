"""What the engine takes in and hands back, and the handle an async caller waits on."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from editserve.engine.sampling import SamplingParams, TokenLogprob

_ids = itertools.count()


@dataclass
class GenerationChunk:
    """What one decode step produced for one request."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished


@dataclass
class PromptScores:
    """Log-probabilities of the prompt tokens (the first has none: nothing precedes it)."""

    logprobs: list[TokenLogprob]


class RequestHandle:
    """The caller's side of one generation: iterate it (async) for chunks, `abort()` to cancel.

    Chunks are pushed from the engine thread with `call_soon_threadsafe`, so the event loop
    never blocks on the model.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.request_id = f"req-{next(_ids)}"
        self.prompt_ids = prompt_ids
        self.params = params
        self.model_version = 0
        self.prompt_scores: PromptScores | None = None
        self.aborted = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        self._done = False

    def abort(self) -> None:
        """Asks the engine to drop this request at its next step (client went away)."""
        self.aborted = True

    # -- called from the engine thread --------------------------------------------------------
    def push(self, item: GenerationChunk | BaseException) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    # -- called from the event loop -----------------------------------------------------------
    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._done and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    async def result(self) -> GenerationResult:
        """Waits for the whole generation and joins its chunks."""
        out = GenerationResult()
        async for chunk in self:
            out.text += chunk.text
            out.token_ids += chunk.token_ids
            if chunk.logprobs is not None:
                out.logprobs = (out.logprobs or []) + chunk.logprobs
            out.finish_reason = chunk.finish_reason or out.finish_reason
        return out


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
