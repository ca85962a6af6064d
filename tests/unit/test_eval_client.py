"""The evaluation client waits out the server's edit rate limit, and resends a probe whose
connection dropped, instead of failing; it never resends an edit."""

from __future__ import annotations

import asyncio

import httpx
import pytest

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


def test_a_probe_whose_connection_dropped_is_sent_again_and_an_edit_is_not() -> None:
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1 or request.url.path == "/edits":
            raise httpx.ReadError("connection closed by the server", request=request)
        return httpx.Response(200, json={"choices": [{"message": {"content": "Paris."}}]})

    async def go() -> str:
        client = EvalClient("http://server", transport=httpx.MockTransport(answer))
        try:
            said = await client.answer("Capital of France?", 8)
            with pytest.raises(httpx.ReadError):
                await client.post_edit("rome", [{"prompt": "p", "subject": "p"}])
            return said
        finally:
            await client.close()

    assert asyncio.run(go()) == "Paris."
    assert calls == ["/v1/chat/completions", "/v1/chat/completions", "/edits"]


def test_a_probe_gives_up_when_the_server_keeps_dropping_it() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("server disconnected", request=request)

    async def go() -> None:
        client = EvalClient("http://server", transport=httpx.MockTransport(answer))
        try:
            await client.complete("The capital of France is", 4)
        finally:
            await client.close()

    with pytest.raises(httpx.RemoteProtocolError):
        asyncio.run(go())
