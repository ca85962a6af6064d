"""One API call's generations (n > 1, several prompts) run on one model version: the header's.

The weight change here negates the LM head, so greedy text tells the two versions apart: a
choice that ran on the other version than its siblings answers differently.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import torch

from editserve.api.app import build_app
from editserve.config import Settings
from editserve.edits.journal import Journal
from editserve.edits.service import EditService
from editserve.engine.request import OutputStream
from editserve.engine.sampling import SamplingParams
from editserve.engine.transformers_engine import TransformersEngine
from editserve.metrics import ServerMetrics
from tests.conftest import tiny_model

MODEL = "tiny-llama"
VERSION = "x-editserve-model-version"


class Server:
    """The app on a tiny model with two batch rows. Once `armed`, the first decode step with one
    row busy waits until two more generations are queued, and the first step with both rows busy
    queues a weight change: both on the engine thread, so the interleaving is deterministic."""

    def __init__(self, state_dir: Path) -> None:
        self.armed = self.held = self.fired = False
        self.engine = TransformersEngine(
            tiny_model("llama", max_len=256), max_batch=2, on_step=self._on_step
        )
        edits = EditService(self.engine, Journal(state_dir))
        edits.replay()
        self.app = build_app(Settings(state_dir=state_dir), self.engine, ServerMetrics(), edits)

    def _on_step(self, batch: int, waiting: int) -> None:
        if not self.armed:
            return
        if batch == 1 and not self.held:
            self.held = True
            deadline = time.monotonic() + 30
            while self.engine.num_waiting < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
        elif batch == 2 and not self.fired:
            self.fired = True
            self.engine.run_exclusive(self._flip)

    def _flip(self) -> None:
        head = self.engine.model.get_output_embeddings().weight
        with torch.no_grad():
            head.neg_()
        self.engine.model_version += 1


@pytest.fixture
def server(tmp_path: Path):
    s = Server(tmp_path)
    s.engine.start()
    yield s
    s.engine.stop()


async def complete(client: httpx.AsyncClient, **body: object) -> httpx.Response:
    payload = {"model": MODEL, "temperature": 0, "ignore_eos": True, "max_tokens": 8}
    return await client.post("/v1/completions", json={**payload, **body})


def test_an_edit_never_lands_between_the_choices_of_one_call(server: Server) -> None:
    async def scenario() -> tuple[str, str, httpx.Response]:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            before = await complete(client, prompt="Hello")
            assert before.headers[VERSION] == "0"
            server.armed = True
            # One row busy: the call's two choices can't both start now. An edit queued as
            # soon as two rows decode must not split them.
            long = asyncio.create_task(complete(client, prompt="A long one", max_tokens=40))
            while not server.held:  # the long one decodes, held until the call is queued
                await asyncio.sleep(0.001)
            call = await complete(client, prompt="Hello", n=2)
            await long
            after = await complete(client, prompt="Hello")
            assert after.headers[VERSION] == "1"
            return before.json()["choices"][0]["text"], after.json()["choices"][0]["text"], call

    v0_text, v1_text, call = asyncio.run(scenario())
    assert server.held and server.fired and server.engine.model_version == 1
    assert v0_text != v1_text  # the change is visible in greedy text
    texts = [c["text"] for c in call.json()["choices"]]
    expected = {"0": v0_text, "1": v1_text}[call.headers[VERSION]]
    assert texts == [expected, expected]


def test_a_group_is_admitted_whole_after_a_pending_change(server: Server) -> None:
    """A group that can't start before a queued weight change starts after it, all of it."""

    async def scenario() -> list[int]:
        busy, group = OutputStream(), OutputStream()
        greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        server.engine.submit([5, 6, 7], greedy, busy)
        await busy.admitted()
        jobs = [([1, 2, 3], greedy), ([4, 5], greedy)]
        server.engine.submit_group(jobs, group)
        server.engine.run_exclusive(server._flip)
        await asyncio.gather(busy.results(), group.results())
        return [h.model_version for h in group.handles]

    assert asyncio.run(scenario()) == [1, 1]


def test_a_call_larger_than_the_batch_is_refused_and_nothing_runs(server: Server) -> None:
    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await complete(client, prompt=["a", "b"], n=2)

    r = asyncio.run(scenario())
    assert r.status_code == 400, r.text
    assert "at most 2 at once" in r.json()["error"]["message"]
    assert server.engine.num_waiting == 0 and server.engine.num_running == 0

    async def direct() -> None:
        server.engine.submit_group([([1], SamplingParams(max_tokens=1))] * 3, OutputStream())

    with pytest.raises(ValueError, match="1 to 2 generations"):
        asyncio.run(direct())
