"""The evaluation's only way to the model: the server's public HTTP API.

Generated answers come from /v1/chat/completions (greedy, through the chat template, as users
get them); teacher-forced scores from /v1/completions with `echo`, `logprobs: 1` and
`max_tokens: 0` (one forward pass over prompt + target); edits from /edits. Every response's
`x-editserve-model-version` is kept, so a measurement can show which weights produced it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

VERSION_HEADER = "x-editserve-model-version"
PROBE_ATTEMPTS = 3  # a probe's tries when the connection drops (edits are never resent)


class EditRefused(Exception):
    """The server answered POST /edits with a 4xx: the edit is invalid, not the server broken."""


@dataclass
class TargetScore:
    """Teacher-forced observations of a target after a prefix, one entry per target token."""

    tokens: list[str]  # the target's tokens
    top1: list[str]  # the model's argmax at each of those positions
    logprobs: list[float]  # log p(target token | everything before it)

    @property
    def hits(self) -> list[bool]:
        return [t == a for t, a in zip(self.tokens, self.top1, strict=True)]


class EvalClient:
    """Async client of one editserve server. `concurrency` bounds requests in flight (the server
    batches them; thousands at once would only queue)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        admin_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 600,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.client = httpx.AsyncClient(base_url=url, timeout=timeout_s, transport=transport)
        self.inference_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.admin_headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.slots = asyncio.Semaphore(concurrency)
        self.model = ""
        self.versions: set[int] = set()  # model versions seen since the last reset

    async def start(self) -> str:
        r = await self.client.get("/v1/models", headers=self.inference_headers)
        r.raise_for_status()
        self.model = r.json()["data"][0]["id"]
        return self.model

    async def close(self) -> None:
        await self.client.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.slots:
            r = await self._read_call(path, body)
        r.raise_for_status()
        if VERSION_HEADER in r.headers:
            self.versions.add(int(r.headers[VERSION_HEADER]))
        return r.json()

    async def _read_call(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """A probe (it changes nothing on the server), sent again when its connection drops
        before the answer. Drops are transient (uvicorn closes keep-alive connections idle for
        5 s, and an edit leaves the pool idle longer: a request racing that close fails), and
        one must not end an hours-long run, as one did 71 cases into AlphaEdit on MQuAKE."""
        for attempt in range(1, PROBE_ATTEMPTS):
            try:
                return await self.client.post(path, json=body, headers=self.inference_headers)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                await asyncio.sleep(0.5 * attempt)
        # The last try's error, if any, reaches the caller.
        return await self.client.post(path, json=body, headers=self.inference_headers)

    # -- generation ------------------------------------------------------------------------------

    async def answer(self, question: str, max_tokens: int) -> str:
        """The greedy chat answer to one user message."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        return (await self._post("/v1/chat/completions", body))["choices"][0]["message"]["content"]

    async def answers(self, questions: list[str], max_tokens: int) -> list[str]:
        return list(await asyncio.gather(*(self.answer(q, max_tokens) for q in questions)))

    async def complete(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> str:
        """A raw-text continuation (no chat template)."""
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "ignore_eos": ignore_eos,
        }
        if seed is not None:
            body["seed"] = seed
        return (await self._post("/v1/completions", body))["choices"][0]["text"]

    # -- teacher forcing -------------------------------------------------------------------------

    async def score_target(self, prefix: str, target: str) -> TargetScore:
        """Scores `prefix + target` in one forward pass; the target's tokens are those whose text
        starts at or after the end of the prefix."""
        body = {
            "model": self.model,
            "prompt": prefix + target,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 1,
        }
        lp = (await self._post("/v1/completions", body))["choices"][0]["logprobs"]
        idx = [i for i, off in enumerate(lp["text_offset"]) if off >= len(prefix) and i > 0]
        top1 = [max(lp["top_logprobs"][i], key=lp["top_logprobs"][i].get) for i in idx]
        return TargetScore(
            tokens=[lp["tokens"][i] for i in idx],
            top1=top1,
            logprobs=[lp["token_logprobs"][i] for i in idx],
        )

    async def target_accuracy(self, prefix: str, target: str) -> float:
        """Teacher-forced token accuracy of `target` after `prefix`."""
        from editserve.eval.metrics import token_accuracy

        return token_accuracy((await self.score_target(prefix, target)).hits)

    # -- edits -----------------------------------------------------------------------------------

    async def post_edit(
        self,
        method: str,
        requests: list[dict[str, Any]],
        kind: str = "modify",
        hparams: dict[str, Any] | None = None,
        scope: str | None = None,
    ) -> dict[str, Any]:
        body = {"method": method, "kind": kind, "requests": requests, "checks": False}
        if hparams:
            body["hparams"] = hparams
        if scope:
            body["scope"] = scope
        r = await self._edit_call("POST", "/edits", json=body)
        if 400 <= r.status_code < 500:
            raise EditRefused(_message(r))
        r.raise_for_status()
        return r.json()

    async def delete_edit(self, edit_id: str) -> dict[str, Any]:
        r = await self._edit_call("DELETE", f"/edits/{edit_id}")
        r.raise_for_status()
        return r.json()

    async def _edit_call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An edit route call that waits out the server's per-key rate limit (429 with
        Retry-After) instead of failing: a sequential run makes hundreds of edits."""
        while True:
            r = await self.client.request(method, path, headers=self.admin_headers, **kwargs)
            if r.status_code != 429:
                return r
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))

    async def applied_edits(self) -> list[dict[str, Any]]:
        """The edits applied now (GET /edits rows), oldest first."""
        r = await self.client.get("/edits", headers=self.admin_headers)
        r.raise_for_status()
        rows = [e for e in r.json()["data"] if e["status"] == "applied"]
        return sorted(rows, key=lambda e: e["model_version"] or 0)

    async def active_edits(self) -> list[str]:
        """Ids of the edits applied now, oldest first."""
        return [e["id"] for e in await self.applied_edits()]


def _message(r: httpx.Response) -> str:
    try:
        return f"{r.status_code}: {r.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code}: {r.text[:300]}"
