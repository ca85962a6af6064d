"""An in-process stand-in for an editserve server's public API (httpx.MockTransport), for
testing the evaluation without a model: the "model" answers from a table of facts, each word a
token, and edits overwrite table entries until they are undone."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx


class FakeServer:
    def __init__(self, facts: dict[str, str]) -> None:
        self.facts = dict(facts)  # prompt -> answer of the unedited model
        self.edits: dict[str, dict[str, Any]] = {}  # id -> {status, requests, version}
        self.version = 0
        self.posts = 0  # POST /edits received
        self.fail_on_post: int | None = None  # the Nth POST /edits raises (a crash)
        self.lose_reply_on_post: int | None = None  # the Nth POST applies, then its reply is lost
        self.fail_on_delete = False
        self.chats = 0  # chat completions served
        self.fail_on_chat: int | None = None  # the Nth chat completion raises
        self.chat_max_tokens: dict[str, int] = {}  # question -> the max_tokens it was asked with

    # -- the model -------------------------------------------------------------------------------

    def answer(self, prompt: str) -> str:
        for edit in self.edits.values():
            if edit["status"] == "applied":
                for r in edit["requests"]:
                    if r["prompt"] == prompt:
                        return r["target_new"]
        return self.facts.get(prompt, "unknown")

    def _completion(self, body: dict) -> dict:
        text = body["prompt"]
        prefix = max((p for p in self._prompts() if text.startswith(p)), key=len, default=text)
        words = text[len(prefix) :].split()
        expected = self.answer(prefix).split()
        tokens, top, lps = [prefix], [None], [None]
        for i, w in enumerate(words):
            guess = expected[i] if i < len(expected) else "<eos>"
            tokens.append(" " + w)
            top.append({" " + guess: -0.1})
            lps.append(-0.1 if guess == w else -3.0)
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        logprobs = {
            "tokens": tokens,
            "top_logprobs": top,
            "token_logprobs": lps,
            "text_offset": offsets,
        }
        if body.get("max_tokens", 16) > 0 and not body.get("echo"):
            return {"choices": [{"text": " " + " ".join(expected * 3), "logprobs": None}]}
        return {"choices": [{"text": text, "logprobs": logprobs}]}

    def _prompts(self) -> set[str]:
        edited = {r["prompt"] for e in self.edits.values() for r in e["requests"]}
        return set(self.facts) | edited

    # -- HTTP ------------------------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        body = json.loads(request.content) if request.content else {}
        headers = {"x-editserve-model-version": str(self.version)}
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake"}]})
        if path == "/v1/chat/completions":
            self.chats += 1
            if self.fail_on_chat == self.chats:
                raise httpx.ConnectError("the server went away")
            question = body["messages"][-1]["content"]
            self.chat_max_tokens[question] = body.get("max_tokens", 16)
            text = f"The answer is {self.answer(question)}."
            return httpx.Response(
                200, json={"choices": [{"message": {"content": text}}]}, headers=headers
            )
        if path == "/v1/completions":
            return httpx.Response(200, json=self._completion(body), headers=headers)
        if path == "/edits" and method == "POST":
            self.posts += 1
            if self.fail_on_post == self.posts:
                raise httpx.ConnectError("the server went away")
            if any(r["subject"] not in r["prompt"] for r in body["requests"]):
                return httpx.Response(400, json={"error": {"message": "subject not in prompt"}})
            self.version += 1
            edit_id = f"edit-{uuid.uuid4().hex[:8]}"
            self.edits[edit_id] = {
                "status": "applied",
                "requests": body["requests"],
                "version": self.version,
            }
            if self.lose_reply_on_post == self.posts:
                raise httpx.ReadError("the client stopped before the reply came")
            return httpx.Response(
                200,
                json={"id": edit_id, "model_version": self.version, "timings": {"compute_s": 0.5}},
            )
        if path == "/edits" and method == "GET":
            data = [
                {
                    "id": i,
                    "status": e["status"],
                    "model_version": e["version"],
                    "requests": e["requests"],
                }
                for i, e in self.edits.items()
            ]
            return httpx.Response(200, json={"data": data})
        if path.startswith("/edits/") and method == "DELETE":
            if self.fail_on_delete:
                raise httpx.ConnectError("the server went away")
            self.edits[path.removeprefix("/edits/")]["status"] = "undone"
            self.version += 1
            return httpx.Response(200, json={"deleted": True})
        return httpx.Response(404, json={"error": {"message": f"no route {method} {path}"}})

    def active(self) -> list[str]:
        return [i for i, e in self.edits.items() if e["status"] == "applied"]
