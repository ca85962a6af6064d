"""MEMIT's and AlphaEdit's statistics in the service: the base model's, whatever edits are in
the live weights, computed in the background at start-up with progress in /health, and kept
per service (AlphaEdit's eigendecompositions included)."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

import methods.stats as stats_module
from editserve.edits.journal import Journal
from editserve.edits.service import EditService
from editserve.engine.transformers_engine import TransformersEngine
from editserve.modelstore import LoadedModel
from methods.alphaedit import compute_alphaedit, load_alphaedit_hparams
from methods.architectures import resolve
from methods.base import EditContext, EditRequest
from methods.stats import StatsCache, StatsSource, corpus_rows, sampled_moments, second_moments
from tests.conftest import tiny_model
from tests.standin import install_shift

LAYERS = [0, 1]  # MEMIT's and AlphaEdit's default layers on the 2-layer tiny model
SOURCE = StatsSource(corpus=None, n_tokens=128, seq_len=16)  # 8 sampled rows: quick
# Keys at layer 1 read layer 0's output: an edit of layer 0 changes them (and the sampled text).
EDIT = {
    "method": "shift",
    "requests": [
        {"prompt": "Where is the Eiffel Tower?", "subject": "Eiffel Tower", "target_new": "Rome"}
    ],
    "hparams": {"layer": 0, "scale": 2.0},
    "checks": False,
}


@pytest.fixture(autouse=True)
def shift_method(monkeypatch: pytest.MonkeyPatch) -> None:
    install_shift(monkeypatch)


def service(
    loaded: LoadedModel, state_dir: Path, cache_dir: Path, source: StatsSource = SOURCE
) -> EditService:
    engine = TransformersEngine(loaded)
    return EditService(engine, Journal(state_dir), StatsCache(cache_dir), source)


def app_of(edits: EditService, state_dir: Path) -> FastAPI:
    from editserve.api.app import build_app
    from editserve.config import Settings
    from editserve.metrics import ServerMetrics

    return build_app(Settings(state_dir=state_dir), edits.engine, ServerMetrics(), edits)


def moments_of(
    model: torch.nn.Module, tokenizer: Any, source: StatsSource = SOURCE
) -> dict[int, torch.Tensor]:
    """The statistics of `model` as its weights are now, computed directly."""
    ctx = EditContext(
        model=model, tokenizer=tokenizer, arch=resolve(model), chat_prompt=lambda q: []
    )
    if source.corpus is None:
        return sampled_moments(ctx, LAYERS, source.n_tokens, source.seq_len, source.seed)
    return second_moments(ctx, LAYERS, corpus_rows(ctx, source.corpus, source.n_tokens, 16))


def pristine_moments(seed: int = 0, source: StatsSource = SOURCE) -> dict[int, torch.Tensor]:
    loaded = tiny_model("llama", seed)  # the same weights as a fresh tiny_model(seed)
    return moments_of(loaded.model, loaded.tokenizer, source)


def assert_same(got: dict[int, torch.Tensor], want: dict[int, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for layer in want:
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-7)


def edited(tmp_path: Path, source: StatsSource = SOURCE) -> EditService:
    """A service whose live weights carry a layer-0 edit, statistics not yet computed."""
    edits = service(tiny_model("llama"), tmp_path / "state", tmp_path / "stats", source)
    with TestClient(app_of(edits, tmp_path / "state")) as client:
        r = client.post("/edits", json=EDIT)
        assert r.status_code == 200, r.text
    return edits


@pytest.mark.parametrize("corpus", [False, True], ids=["sampled", "corpus"])
def test_statistics_computed_after_a_global_edit_are_the_pristine_models(
    tmp_path: Path, corpus: bool
) -> None:
    source = SOURCE
    if corpus:
        (tmp_path / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. " * 9)
        source = StatsSource(corpus=str(tmp_path / "corpus.txt"), n_tokens=128, seq_len=16)
    edits = edited(tmp_path, source)
    pristine = pristine_moments(source=source)
    live = moments_of(edits.engine.model, edits.tokenizer, source)
    assert not torch.allclose(live[1], pristine[1], rtol=1e-3)  # the edit moves them
    assert_same(edits.second_moments(LAYERS), pristine)
    # The live weights are untouched by the computation.
    assert_same(moments_of(edits.engine.model, edits.tokenizer, source), live)


def test_a_second_service_on_the_same_cache_gets_pristine_statistics(tmp_path: Path) -> None:
    edited(tmp_path).second_moments(LAYERS)  # computed and cached by the edited server
    cache = StatsCache(tmp_path / "stats")
    fresh = service(tiny_model("llama"), tmp_path / "other-state", tmp_path / "stats")
    fingerprint = fresh.context.model_fingerprint
    assert all(cache.path(fingerprint, SOURCE, layer).is_file() for layer in LAYERS)  # read
    assert_same(fresh.second_moments(LAYERS), pristine_moments())


def test_statistics_started_after_replay_are_the_pristine_models(tmp_path: Path) -> None:
    edited(tmp_path)  # journals the edit
    restarted = service(tiny_model("llama"), tmp_path / "state", tmp_path / "fresh-stats")
    restarted.replay()
    assert restarted.ledger.active_ids  # the live weights carry the edit again
    restarted.start_statistics()
    assert_same(restarted.second_moments(LAYERS), pristine_moments())
    assert restarted.statistics.status() == {"state": "ready", "layers": LAYERS}


def test_start_up_computes_them_in_the_background_and_health_shows_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 72 rows: a batch of 64, then one of 8, held back until the test lets it run.
    source = StatsSource(corpus=None, n_tokens=72 * 16, seq_len=16)
    pristine = pristine_moments(source=source)
    reached, release = threading.Event(), threading.Event()
    real, calls = stats_module._sample, []

    def gated(*args: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            reached.set()
            assert release.wait(60)
        real(*args)

    monkeypatch.setattr(stats_module, "_sample", gated)
    edits = service(tiny_model("llama"), tmp_path / "state", tmp_path / "stats", source)
    assert edits.statistics.status() == {"state": "idle"}
    edits.start_statistics()  # returns at once: the computation runs in a thread
    with TestClient(app_of(edits, tmp_path / "state")) as client:
        assert reached.wait(60)
        health = client.get("/health").json()
        assert health["stats"] == {
            "state": "computing",
            "layers": LAYERS,
            "done": 1024,
            "total": 1152,
        }
        # Another method's edit lands meanwhile, and does not reach them (pristine copies).
        assert client.post("/edits", json=EDIT).json()["status"] == "applied"
        # A MEMIT edit arriving now waits for them, then edits as usual.
        threading.Timer(0.5, release.set).start()
        body = {**EDIT, "method": "memit", "hparams": {"steps": 2}}
        r = client.post("/edits", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "applied" and r.json()["timings"]["stats_wait_s"] >= 0.3
        assert client.get("/health").json()["stats"] == {"state": "ready", "layers": LAYERS}
    assert len(calls) == 2  # computed once, at start-up; the edit used them
    assert_same(edits.second_moments(LAYERS), pristine)


def test_health_says_off_without_statistics(tmp_path: Path) -> None:
    engine = TransformersEngine(tiny_model("llama"))
    edits = EditService(engine, Journal(tmp_path))
    with TestClient(app_of(edits, tmp_path)) as client:
        assert client.get("/health").json()["stats"] == {"state": "off"}


def test_two_services_keep_their_own_eigendecompositions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = service(tiny_model("llama", seed=0), tmp_path / "a", tmp_path / "stats")
    second = service(tiny_model("llama", seed=1), tmp_path / "b", tmp_path / "stats")
    decomposed = {}
    for edits in (first, second):
        moment = edits.second_moments([1])[1]
        eigh = edits.context.moment_eigh(1)
        assert edits.context.moment_eigh(1) is eigh  # decomposed once per service
        want = torch.linalg.eigh(moment.double())
        torch.testing.assert_close(eigh[0], want[0])
        decomposed[id(edits)] = eigh
    assert not torch.allclose(decomposed[id(first)][0], decomposed[id(second)][0])

    # An AlphaEdit edit reads its own service's decompositions: none is computed again.
    first.context.moment_eigh(0)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(1) or eigh(m))
    h = load_alphaedit_hparams("llama", 2, {"steps": 2})
    request = EditRequest(
        prompt="The city of the Eiffel Tower", subject="Eiffel Tower", target_new="R"
    )
    compute_alphaedit(first.context, [request], h)
    assert calls == []
    compute_alphaedit(second.context, [request], h)
    assert calls == [1]  # layer 0 of the second model: its own, not the first's

    # They leave with their service.
    gone = weakref.ref(decomposed.pop(id(first))[1])
    del first
    gc.collect()
    assert gone() is None


def test_sampling_reports_progress_after_every_step() -> None:
    loaded = tiny_model("llama")
    ctx = EditContext(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        arch=resolve(loaded.model),
        chat_prompt=lambda q: [],
    )
    seen: list[tuple[int, int]] = []
    sampled_moments(ctx, LAYERS, 3 * 8, 8, seed=0, batch=2, progress=lambda *p: seen.append(p))
    # Rows of 8 tokens in batches of 2 rows, then 1: 2 tokens a step, then 1.
    assert seen == [(2 * i, 24) for i in range(1, 9)] + [(16 + i, 24) for i in range(1, 9)]


def test_a_failed_start_up_computation_is_shown_and_retried_by_the_next_edit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edits = service(tiny_model("llama"), tmp_path / "state", tmp_path / "stats")
    real = StatsCache.get
    monkeypatch.setattr(StatsCache, "get", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
    started = edits.statistics.start(LAYERS)
    with pytest.raises(OSError):
        started.result(timeout=60)
    assert edits.statistics.status() == {
        "state": "failed",
        "layers": LAYERS,
        "error": "OSError('full')",
    }
    monkeypatch.setattr(StatsCache, "get", real)
    assert_same(edits.second_moments(LAYERS), pristine_moments())
    assert edits.statistics.status()["state"] == "ready"
