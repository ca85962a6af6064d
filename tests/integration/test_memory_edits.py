"""IKE, SERAC and GRACE through a live server on the embedded model and the real `openai` client:
each edit changes the chat answer to its question and to a paraphrase, leaves unrelated questions
alone, survives a restart, and DELETE gives the old answers back."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import LiveServer
from tests.integration.test_edits import UNRELATED, ask

pytestmark = pytest.mark.integration

# Facts the embedded model gets right before the edit, one per method (each method's hold on
# strong priors differs: ICE alone, for one, does not move the Eiffel Tower; see
# docs/memory-edits.md for rates over ZsRE records).
FACTS = {
    "ike": {
        "prompt": "What is the capital of France?",
        "subject": "France",
        "target_new": "Lyon",
        "rephrase": ["Which city is the capital of France?"],
    },
    "serac": {
        "prompt": "What language is spoken in Brazil?",
        "subject": "Brazil",
        "target_new": "Spanish",
        "rephrase": ["Which language do people in Brazil speak?"],
    },
    "grace": {
        "prompt": "In which city is the Eiffel Tower?",
        "subject": "Eiffel Tower",
        "target_new": "Rome",
        "rephrase": ["In which city is the Eiffel Tower located?"],  # GRACE: within the radius
    },
}


def test_memory_edits_change_the_answers_survive_a_restart_and_undo(live: LiveServer) -> None:
    questions = [q for f in FACTS.values() for q in (f["prompt"], *f["rephrase"])]
    before = {q: ask(live.url, q)[0] for q in [*questions, *UNRELATED]}
    assert "Paris" in before[FACTS["ike"]["prompt"]]

    ids = {}
    for method, fact in FACTS.items():
        r = httpx.post(
            f"{live.url}/edits",
            json={"method": method, "requests": [fact]},
            timeout=300,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        checks = body["checks"]["requests"]
        assert all(c["success"] for c in checks), (method, checks)
        ids[method] = body["id"]

    def check_edited() -> None:
        for method, fact in FACTS.items():
            for question in (fact["prompt"], *fact["rephrase"]):
                answer, _ = ask(live.url, question)
                assert fact["target_new"] in answer, (method, question, answer)
        for question in UNRELATED:
            assert ask(live.url, question)[0] == before[question], question

    check_edited()
    version = ask(live.url, UNRELATED[0])[1]
    live.stop()
    live.start()
    check_edited()
    assert ask(live.url, UNRELATED[0])[1] == version

    for method in ("serac", "ike", "grace"):  # not in creation order
        r = httpx.delete(f"{live.url}/edits/{ids[method]}")
        assert r.status_code == 200 and r.json()["deleted"], r.text
        for question in (FACTS[method]["prompt"], *FACTS[method]["rephrase"]):
            assert ask(live.url, question)[0] == before[question], (method, question)


def test_a_served_scope_classifier_decides_serac_scope(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`serac_scope` is loaded at start and judges SERAC's scope instead of the cosine threshold
    (a classifier that rates every pair in scope, so the test is about the wiring; the trained
    one's quality is in docs/memory-edits.md)."""
    import openai
    import torch

    from memory.scope import ScopeClassifier
    from tests.integration.conftest import API_KEY, MODEL

    folder = tmp_path_factory.mktemp("scope")
    in_scope = ScopeClassifier()
    torch.nn.init.zeros_(in_scope.net[2].weight)
    torch.nn.init.constant_(in_scope.net[2].bias, 20.0)
    in_scope.save(folder / "scope.safetensors")
    server = LiveServer(
        tmp_path_factory.mktemp("state"),
        folder,
        env={"EDITSERVE_SERAC_SCOPE": str(folder / "scope.safetensors")},
    )
    server.start()
    try:
        assert "SERAC scope:" in server.log()
        fact = FACTS["serac"]
        r = httpx.post(
            f"{server.url}/edits",
            # At 0.99 cosine only the question itself would be in scope.
            json={"method": "serac", "requests": [fact], "hparams": {"threshold": 0.99}},
            timeout=300,
        )
        assert r.status_code == 200, r.text
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": fact["rephrase"][0]}],
            temperature=0,
            max_tokens=24,
        )
        assert raw.headers["x-editserve-memory-edits"] == r.json()["id"]
        assert fact["target_new"] in raw.parse().choices[0].message.content
    finally:
        server.stop()
