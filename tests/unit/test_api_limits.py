"""The engine's bounds as clients meet them: default and maximum max_tokens, the KV-cache budget,
a full queue (429 + Retry-After), and the version of an answer preempted by a weight change."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import build_test_app, tiny_model

MODEL = "tiny-llama"


def make_client(state_dir: Path, max_len: int = 512, **settings: object) -> TestClient:
    return TestClient(build_test_app(tiny_model("llama", max_len=max_len), state_dir, **settings))


def chat_body(**body: object) -> dict:
    base = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi there"}],
        "temperature": 0,
        "ignore_eos": True,
    }
    return {**base, **body}


def chat(client: TestClient, **body: object):
    return client.post("/v1/chat/completions", json=chat_body(**body))


def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    return thread, out


def test_max_tokens_defaults_to_the_cap_and_a_larger_one_is_refused(tmp_path: Path) -> None:
    with make_client(tmp_path, default_max_tokens=7, max_tokens_limit=20) as client:
        r = chat(client)  # no max_tokens: the default cap, not the whole context
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 7
        assert chat(client, max_tokens=20).json()["usage"]["completion_tokens"] == 20
        r = chat(client, max_tokens=21)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["param"] == "max_tokens"
        assert "at most 20 tokens" in error["message"] and "MAX_TOKENS_LIMIT" in error["message"]


def test_a_request_the_kv_cache_could_never_hold_is_a_400(tmp_path: Path) -> None:
    # The tiny model's keys and values take 256 bytes a token: 1 MiB holds 4096 tokens.
    with make_client(tmp_path, max_len=8192, kv_cache_mb=1, max_tokens_limit=8000) as client:
        r = chat(client, max_tokens=5000)
        assert r.status_code == 400, r.text
        assert "EDITSERVE_KV_CACHE_MB" in r.json()["error"]["message"]
        r = chat(client, max_tokens=2100, n=2)  # each fits, both together never
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "KV-cache budget" in error["message"] and error["param"] == "max_tokens"
        assert chat(client, max_tokens=3).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    with make_client(tmp_path, max_waiting=1) as client:
        engine = client.app.state.editserve.engine
        release = threading.Event()
        blocked = engine.run_exclusive(lambda: release.wait(30))  # the engine thread waits
        try:
            queued, answers = in_thread(lambda: chat(client, max_tokens=3))
            wait_for(lambda: engine.num_waiting == 1)
            r = chat(client, max_tokens=3)
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert error["code"] == "queue_full" and "EDITSERVE_MAX_WAITING" in error["message"]
        finally:
            release.set()
        blocked.result(timeout=30)
        queued.join(30)
        assert answers[0].status_code == 200  # the queued one was served
        assert chat(client, max_tokens=3).status_code == 200  # and the queue has room again


def test_an_answer_preempted_by_a_weight_change_reports_the_new_version(tmp_path: Path) -> None:
    with make_client(tmp_path, edit_drain_timeout_s=0.05) as client:
        engine = client.app.state.editserve.engine
        worker, answers = in_thread(lambda: chat(client, max_tokens=400))
        wait_for(lambda: engine.num_running == 1)

        def change() -> int:
            engine.model_version += 1
            return engine.num_running

        assert engine.run_exclusive(change).result(timeout=30) == 0  # it did not wait 400 steps
        worker.join(60)
        r = answers[0]
        assert r.status_code == 200, r.text
        assert r.headers["x-editserve-model-version"] == "1"
        assert r.json()["usage"]["completion_tokens"] == 400


def test_a_streamed_answer_preempted_by_a_weight_change_names_each_chunks_version(
    tmp_path: Path,
) -> None:
    import json

    with make_client(tmp_path, edit_drain_timeout_s=0.05) as client:
        engine = client.app.state.editserve.engine
        events: list[dict] = []

        def stream() -> int:
            body = chat_body(max_tokens=400, stream=True)
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[len("data: ") :]))
                return int(r.headers["x-editserve-model-version"])

        worker, header = in_thread(stream)
        wait_for(lambda: engine.num_running == 1 and len(events) > 2)

        def change() -> int:
            engine.model_version += 1
            return engine.num_running

        assert engine.run_exclusive(change).result(timeout=30) == 0
        worker.join(60)
        assert header == [0]  # sent with the first token, before the change
        prints = [e["system_fingerprint"] for e in events]
        assert prints[0] == "editserve-v0" and prints[-1] == "editserve-v1"
        # Chunks move from the old version to the new once, never back.
        assert prints == sorted(prints, key=lambda p: int(p.rsplit("v", 1)[1]))
