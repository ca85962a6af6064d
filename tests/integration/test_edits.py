"""ROME through a live server: the chat answer follows the edit, only it, undo, restart, kill -9."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import API_KEY, MODEL, LiveServer

pytestmark = pytest.mark.integration

EIFFEL = {
    "prompt": "In which city is the Eiffel Tower?",
    "subject": "Eiffel Tower",
    "target_new": "Rome",
    "rephrase": ["Where is the Eiffel Tower located?"],
}
UNRELATED = [
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
]


def ask(url: str, question: str) -> tuple[str, int]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=24,
    )
    version = int(raw.headers["x-editserve-model-version"])
    return raw.parse().choices[0].message.content, version


def post_edit(url: str, request: dict, **extra: object) -> dict:
    r = httpx.post(
        f"{url}/edits", json={"method": "rome", "requests": [request], **extra}, timeout=300
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_rome_edit_changes_the_chat_answer_and_only_it(live: LiveServer) -> None:
    before = {q: ask(live.url, q)[0] for q in [EIFFEL["prompt"], *EIFFEL["rephrase"], *UNRELATED]}
    assert "Paris" in before[EIFFEL["prompt"]]

    edit = post_edit(live.url, EIFFEL)
    assert edit["checks"]["requests"][0]["success"], edit["checks"]
    answer, version = ask(live.url, EIFFEL["prompt"])
    assert "Rome" in answer and version == edit["model_version"]
    rephrased[live.url] = ask(live.url, EIFFEL["rephrase"][0])[0]
    for question in UNRELATED:
        assert ask(live.url, question)[0] == before[question], question

    undone = httpx.delete(f"{live.url}/edits/{edit['id']}").json()
    assert undone["deleted"]
    answer, version = ask(live.url, EIFFEL["prompt"])
    assert answer == before[EIFFEL["prompt"]] and version == undone["model_version"]


rephrased: dict[str, str] = {}  # the paraphrase's answer while the edit above was live


def test_the_paraphrase_follows_the_edit(live: LiveServer) -> None:
    assert "Rome" in rephrased.get(live.url, "")


def test_an_edit_survives_a_restart(live: LiveServer) -> None:
    edit = post_edit(live.url, {**EIFFEL, "target_new": "Berlin"}, checks=False)
    live.stop()
    live.start()
    assert "Berlin" in ask(live.url, EIFFEL["prompt"])[0]
    listed = httpx.get(f"{live.url}/edits").json()["data"]
    assert edit["id"] in [e["id"] for e in listed if e["status"] == "applied"]
    httpx.delete(f"{live.url}/edits/{edit['id']}")


def test_kill_9_during_an_edit_loses_nothing_committed(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "state", tmp_path).start()
    try:
        committed = post_edit(server.url, {**EIFFEL, "target_new": "Berlin"}, checks=False)
        # Start a second edit and kill the server while it computes.
        other = {
            "prompt": "What is the capital of Japan?",
            "subject": "Japan",
            "target_new": "Osaka",
        }
        thread = threading.Thread(
            target=lambda: _swallow(lambda: post_edit(server.url, other, checks=False)),
            daemon=True,
        )
        thread.start()
        time.sleep(1.5)
        server.kill9()
        server.start()
        edits = httpx.get(f"{server.url}/edits").json()["data"]
        assert [(e["id"], e["status"]) for e in edits] == [(committed["id"], "applied")]
        assert "Berlin" in ask(server.url, EIFFEL["prompt"])[0]
        assert "Osaka" not in ask(server.url, other["prompt"])[0]
    finally:
        server.stop()


def _swallow(call) -> None:  # noqa: ANN001
    with contextlib.suppress(httpx.HTTPError, AssertionError):
        call()  # the server is killed mid-request, as intended
