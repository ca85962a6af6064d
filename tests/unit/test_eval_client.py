"""The evaluation client waits out the server's edit rate limit instead of failing."""

from __future__ import annotations

import asyncio

import httpx

from editserve.eval.client import EvalClient


def test_edit_calls_retry_after_a_429() -> None:
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) % 2 == 1:  # every first try is refused
            return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {}})
        if request.method == "POST":
            return httpx.Response(200, json={"id": "edit-1", "model_version": 1})
        return httpx.Response(200, json={"id": "edit-1", "deleted": True})

    async def go() -> tuple[dict, dict]:
        client = EvalClient("http://server", transport=httpx.MockTransport(answer))
        try:
            made = await client.post_edit("rome", [{"prompt": "p", "subject": "p"}])
            return made, await client.delete_edit("edit-1")
        finally:
            await client.close()

    made, deleted = asyncio.run(go())
    assert made["id"] == "edit-1" and deleted["deleted"]
    assert calls == ["POST", "POST", "DELETE", "DELETE"]
