"""What the engine takes in and hands back, and the stream an async caller reads.

One API call may ask for several generations (prompts x n). Each is a `RequestHandle` in the
engine; all of them push into one `OutputStream`, tagged with their choice index, so the caller
reads a single ordered stream. Chunks are pushed from the engine thread with
`call_soon_threadsafe`, so the event loop never blocks on the model.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from editserve.engine.row_deltas import RowDelta
from editserve.engine.sampling import SamplingParams, TokenLogprob

_ids = itertools.count()


@dataclass
class GenerationChunk:
    """What one step produced for one request."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" once finished
    # The version of the weights that produced it: a request preempted by a weight change
    # resumes on the new weights, and its later chunks say so.
    model_version: int = -1


@dataclass
class GenerationResult:
    """A whole generation: its chunks joined."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + chunk.logprobs
        self.finish_reason = chunk.finish_reason or self.finish_reason


class OutputStream:
    """The chunks of one or more generations, in the order the engine produced them."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException]] = asyncio.Queue()
        self.handles: list[RequestHandle] = []
        self._admitted = 0
        self._all_admitted = asyncio.Event()

    def mark_admitted(self) -> None:
        """Thread-safe: the engine calls this as each generation joins the batch."""
        self._loop.call_soon_threadsafe(self._count_admitted)

    def _count_admitted(self) -> None:
        self._admitted += 1
        if self._admitted == len(self.handles):
            self._all_admitted.set()

    async def admitted(self) -> None:
        """Returns once every generation has joined the batch (their model version is known)."""
        await self._all_admitted.wait()

    def push(self, index: int, item: GenerationChunk | BaseException) -> None:
        """Thread-safe: the engine thread calls this."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))

    async def __aiter__(self) -> AsyncIterator[tuple[int, GenerationChunk]]:
        unfinished = len(self.handles)
        while unfinished:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                unfinished -= 1
            yield index, item

    async def results(self) -> list[GenerationResult]:
        """Waits for every generation; results are in handle order."""
        results = [GenerationResult() for _ in self.handles]
        async for index, chunk in self:
            results[index].add(chunk)
        return results

    def abort(self) -> None:
        """Asks the engine to drop every unfinished generation (the client went away)."""
        for handle in self.handles:
            handle.aborted = True


@dataclass
class PromptScores:
    """Log-probabilities of the prompt tokens (the first has none: nothing precedes it)."""

    logprobs: list[TokenLogprob]


class RequestHandle:
    """The engine's record of one generation and where its chunks go."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stream: OutputStream,
        still_valid: Callable[[], bool] | None = None,
        row_deltas: tuple[RowDelta, ...] = (),
    ):
        self.request_id = f"req-{next(_ids)}"
        self.prompt_ids = prompt_ids
        self.params = params
        self.stream = stream
        self.index = len(stream.handles)
        stream.handles.append(self)
        self.model_version = -1  # set when the engine admits it (again, when it resumes)
        self.preemptions = 0  # times a weight change preempted it (it resumed on new weights)
        self.prompt_scores: PromptScores | None = None
        self.aborted = False
        # Asked on the engine thread at admission: False means the prompt was rendered from
        # state that has changed since (the edit memory); the engine then marks it `stale`
        # instead of running it, and the caller renders it again.
        self.still_valid = still_valid
        self.stale = False
        # The scoped deltas its rows get in every forward, resumed ones included: the objects,
        # not edit ids, so that removing an edit never changes a request already submitted.
        self.row_deltas = tuple(row_deltas)

    def push(self, item: GenerationChunk | BaseException) -> None:
        self.stream.push(self.index, item)
