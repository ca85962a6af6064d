"""kill -9 at every step of an edit's commit and of an undo, then a restart, on the embedded
model: no committed edit lost, no half edit, and the model answers exactly as the journal says
(bit-identical prompt log-probabilities). Also: a damaged payload is refused at replay with a
clear log line while the other edits come back.

The process dies at named crash points (`EDITSERVE_CRASH_AT`, editserve/faults.py) by SIGKILL,
so nothing gets to clean up, as with kill -9 from outside.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from editserve.faults import POINTS
from tests.integration.conftest import API_KEY, MODEL, LiveServer

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

PROBE = "The Eiffel Tower is located in the city of Paris, the capital of France."
EIFFEL = {"prompt": "Where is the Eiffel Tower?", "subject": "Eiffel Tower", "target_new": "Rome"}
JAPAN = {"prompt": "What is the capital of Japan?", "subject": "Japan", "target_new": "Osaka"}
FAST_ROME = {"steps": 6, "n_contexts": 2}  # a real ROME delta; its quality is not the point here


def post_edit(url: str, request: dict, timeout: float = 300) -> httpx.Response:
    body = {"method": "rome", "requests": [request], "hparams": FAST_ROME, "checks": False}
    return httpx.post(f"{url}/edits", json=body, timeout=timeout)


def probe_logprobs(url: str) -> list[float]:
    """The prompt's token log-probabilities: any change to the weights shows here."""
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": PROBE, "max_tokens": 0, "echo": True, "logprobs": 0},
        headers={"authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    r.raise_for_status()
    return r.json()["choices"][0]["logprobs"]["token_logprobs"]


def journal_view(url: str) -> list[tuple[str, str]]:
    return [(e["id"], e["status"]) for e in httpx.get(f"{url}/edits", timeout=30).json()["data"]]


def crash_during(server: LiveServer, point: str, action) -> None:  # noqa: ANN001
    """Starts the server set to die at `point`, runs `action` (which it dies in), waits."""
    server.extra_env["EDITSERVE_CRASH_AT"] = point
    server.start()
    server.extra_env.pop("EDITSERVE_CRASH_AT")
    with pytest.raises(httpx.TransportError):  # the connection dies with the process
        action()
    assert server.proc.wait(60) == -9, f"the server did not die at {point}:\n{server.log()}"


def test_kill_9_at_every_step_of_an_edit_and_an_undo(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "state", tmp_path).start()
    try:
        base = probe_logprobs(server.url)
        committed = post_edit(server.url, EIFFEL)
        assert committed.status_code == 200, committed.text
        edit_id = committed.json()["id"]
        with_edit = probe_logprobs(server.url)
        assert with_edit != base  # the probe sees the edit
        server.stop()

        for point in [p for p in POINTS if p != "during_undo"]:
            crash_during(server, point, lambda: post_edit(server.url, JAPAN))
            server.start()  # a clean restart after each crash
            assert journal_view(server.url) == [(edit_id, "applied")], point
            assert probe_logprobs(server.url) == with_edit, point
            payloads = sorted(p.name for p in (tmp_path / "state" / "edits").iterdir())
            assert payloads == [f"{edit_id}.safetensors"], (point, payloads)
            server.stop()

        # An undo journaled just before the process died is an undo: the edit stays gone.
        crash_during(
            server,
            "during_undo",
            lambda: httpx.delete(f"{server.url}/edits/{edit_id}", timeout=60),
        )
        server.start()
        assert journal_view(server.url) == [(edit_id, "undone")]
        assert probe_logprobs(server.url) == base
    finally:
        server.stop()


def test_a_damaged_payload_is_refused_at_replay_and_the_others_come_back(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "state", tmp_path).start()
    try:
        first = post_edit(server.url, EIFFEL).json()["id"]
        with_first = probe_logprobs(server.url)
        second = post_edit(server.url, JAPAN).json()["id"]
        server.stop()

        damaged = tmp_path / "state" / "edits" / f"{second}.safetensors"
        data = bytearray(damaged.read_bytes())
        data[-20] ^= 0xFF  # one flipped byte in the tensor data
        damaged.write_bytes(bytes(data))

        server.start()
        log = server.log_path.read_text()
        assert f"edit {second} NOT replayed" in log and "damaged" in log
        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "ok" and health["edits_not_replayed"] == [second]
        shown = httpx.get(f"{server.url}/edits/{second}").json()
        assert shown["status"] == "not_replayed" and "damaged" in shown["error"]
        assert probe_logprobs(server.url) == with_first  # the first edit alone is live

        # The operator drops the damaged edit; the journal agrees with the model again.
        assert httpx.delete(f"{server.url}/edits/{second}", timeout=60).status_code == 200
        assert journal_view(server.url) == [(first, "applied"), (second, "undone")]
        assert probe_logprobs(server.url) == with_first
    finally:
        server.stop()
