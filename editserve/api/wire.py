"""The wire pieces of OpenAI-style answers: ids, SSE framing, the version header and
fingerprint, and cancelling work when the client disconnects."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from editserve.api.errors import ClientDisconnected, error_body
from editserve.engine.request import OutputStream

T = TypeVar("T")
VERSION_HEADER = "x-editserve-model-version"


def version(stream: OutputStream) -> dict[str, str]:
    """The model version every generation of this call ran on (the engine never mixes two),
    or, for a call preempted by a weight edit, the version it finished on (the newest)."""
    return {VERSION_HEADER: str(max(h.model_version for h in stream.handles))}


def fingerprint(model_version: int) -> dict[str, str]:
    """OpenAI's `system_fingerprint`, per streamed chunk: the version that produced it. The
    header is sent before the first token, and a drain-timeout preemption can move a running
    request onto a newer version after that (editserve.engine.scheduler)."""
    return {"system_fingerprint": f"editserve-v{model_version}"}


def meta(prefix: str, obj: str, model: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
    }


def chunk_choice(index: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def sse(events: AsyncIterator[dict], stream: OutputStream, headers: dict) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except Exception as exc:  # headers are gone: report in-band, as OpenAI does
            yield f"data: {json.dumps(error_body(f'generation failed: {exc}', 'server_error'))}\n\n"
        finally:
            stream.abort()  # the client left (or we finished): free the batch rows
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def until_disconnect(http: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected()
