"""MEMIT, AlphaEdit and FT-M through a live server: a batch of facts changes the chat answers,
unrelated answers stay, DELETE restores them, a restart keeps an edit."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import LiveServer
from tests.integration.test_edits import UNRELATED, ask

pytestmark = pytest.mark.integration

FACTS = [
    {
        "prompt": "In which city is the Eiffel Tower?",
        "subject": "Eiffel Tower",
        "target_new": "Rome",
        "rephrase": ["Where is the Eiffel Tower located?"],
    },
    {
        "prompt": "Who wrote the novel War and Peace?",
        "subject": "War and Peace",
        "target_new": "Charles Dickens",
    },
]
METHODS = ["memit", "alphaedit", "ft"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # Few tokens of self-sampled statistics keep start-up quick in CI; computed in the
    # background at start-up, as a user's server does.
    server = LiveServer(
        tmp_path_factory.mktemp("batch-state"),
        tmp_path_factory.mktemp("logs"),
        env={"EDITSERVE_STATS_TOKENS": "2048", "EDITSERVE_STATS_AT_START": "true"},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def before(live: LiveServer) -> dict[str, str]:
    questions = [f["prompt"] for f in FACTS] + FACTS[0]["rephrase"] + UNRELATED
    return {q: ask(live.url, q)[0] for q in questions}


def test_start_up_computes_the_statistics_in_the_background(live: LiveServer) -> None:
    # Served at once (the server answered /health to start), statistics ready soon after.
    deadline, stats = time.monotonic() + 600, {}  # as long as an edit request may take
    while time.monotonic() < deadline:
        stats = httpx.get(f"{live.url}/health").json()["stats"]
        if stats["state"] not in ("idle", "computing"):
            break
        time.sleep(1)
    assert stats["state"] == "ready" and stats["layers"], stats
    assert "statistics of layers" in live.log_path.read_text()


def post(url: str, method: str, facts: list[dict], **extra: object) -> dict:
    r = httpx.post(
        f"{url}/edits",
        json={"method": method, "requests": facts, "checks": False, **extra},
        timeout=600,
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_changes_the_chat_answers_and_only_them(
    live: LiveServer, before: dict[str, str], method: str
) -> None:
    assert "Paris" in before[FACTS[0]["prompt"]]
    edit = post(live.url, method, FACTS)
    for fact in FACTS:
        answer, version = ask(live.url, fact["prompt"])
        assert fact["target_new"] in answer, (method, answer)
        assert version == edit["model_version"]
    paraphrases[method] = ask(live.url, FACTS[0]["rephrase"][0])[0]
    unrelated[method] = {q: ask(live.url, q)[0] for q in UNRELATED}

    undone = httpx.delete(f"{live.url}/edits/{edit['id']}").json()
    assert undone["deleted"]
    for fact in FACTS:
        assert ask(live.url, fact["prompt"])[0] == before[fact["prompt"]]


# Answers while each method's edit was live (the test above runs first).
paraphrases: dict[str, str] = {}
unrelated: dict[str, dict[str, str]] = {}

FT_LOCALITY = pytest.mark.xfail(
    strict=True,
    reason="known gap: FT-M's dense update, boxed tightly enough to keep unrelated answers, no "
    "longer reaches the targets on this model (docs/batch-edits.md)",
)


@pytest.mark.parametrize("method", ["memit", "alphaedit", pytest.param("ft", marks=FT_LOCALITY)])
def test_unrelated_answers_stay(before: dict[str, str], method: str) -> None:
    assert unrelated[method] == {q: before[q] for q in UNRELATED}


FT_PARAPHRASE = pytest.mark.xfail(
    strict=True, reason="known gap: FT-M learns the prompt's wording, not the fact"
)


@pytest.mark.parametrize("method", ["memit", "alphaedit", pytest.param("ft", marks=FT_PARAPHRASE)])
def test_the_paraphrase_follows_the_edit(live: LiveServer, method: str) -> None:
    assert "Rome" in paraphrases.get(method, ""), paraphrases.get(method)


def test_an_alphaedit_edit_survives_a_restart(live: LiveServer, before: dict[str, str]) -> None:
    edit = post(live.url, "alphaedit", FACTS[:1])
    live.stop()
    live.start()
    assert "Rome" in ask(live.url, FACTS[0]["prompt"])[0]
    httpx.delete(f"{live.url}/edits/{edit['id']}")
    assert ask(live.url, FACTS[0]["prompt"])[0] == before[FACTS[0]["prompt"]]
