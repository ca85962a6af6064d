"""Scoring observations of one record into KnowEdit metrics, on hand-made observations."""

from __future__ import annotations

import math

import pytest

from editserve.eval.datasets import EvalRecord, Probe, Sentiment
from editserve.eval.scoring import add_counts, probe_counts, score, summarise

RECORD = EvalRecord(
    index=0,
    requests=({"prompt": "Capital of France?", "subject": "France", "target_new": "Lyon"},),
    reliability=(Probe("Capital of France?", ("Lyon",)),),
    generalization=(Probe("France's capital?", ("Lyon",)),),
    portability={"Reasoning": (Probe("River of France's capital?", ("Rhône", "Rhone")),)},
    locality={
        "Relation_Specificity": (Probe("Language of France?", ("French",)),),
        "Other": (Probe("Capital of Spain?", ("Madrid",)), Probe("Capital of Italy?", ("Rome",))),
    },
)


def obs(prompt: str, tokens: list[str], top1: list[str], answer: str) -> dict:
    return {"prompt": prompt, "tokens": tokens, "top1": top1, "answer": answer}


PRE = {
    "reliability": [obs("Capital of France?", [" Ly", "on"], [" Paris", "on"], "It is Paris.")],
    "generalization": [obs("France's capital?", [" Ly", "on"], [" Paris", "."], "Paris.")],
    "portability": {"Reasoning": [obs("River?", [" Rh", "ône"], [" Se", "ine"], "The Seine.")]},
    "locality": {
        "Relation_Specificity": [obs("Language?", [" French"], [" French"], "French.")],
        "Other": [
            obs("Spain?", [" Madrid"], [" Madrid"], "Madrid."),
            obs("Italy?", [" Rome", "."], [" Rome", "."], "Rome."),
        ],
    },
    "fluency": {"raw": "a b a b", "chat": "a b a b"},
}
POST = {
    "reliability": [obs("Capital of France?", [" Ly", "on"], [" Ly", "on"], "It is Lyon.")],
    "generalization": [obs("France's capital?", [" Ly", "on"], [" Ly", "."], "Paris.")],
    "portability": {"Reasoning": [obs("River?", [" Rh", "ône"], [" Rh", "ine"], "The Rhone.")]},
    "locality": {
        "Relation_Specificity": [obs("Language?", [" French"], [" Lyon"], "Lyon.")],
        "Other": [
            obs("Spain?", [" Madrid"], [" Madrid"], "Madrid."),
            obs("Italy?", [" Rome", "."], [" Rome", ","], "Rome."),
        ],
    },
    "fluency": {"raw": "Lyon Lyon Lyon Lyon", "chat": "a b a b"},
}


def test_score_of_an_edit() -> None:
    m = score(RECORD, POST, PRE)
    assert m["reliability_tf"] == 1.0 and m["reliability_gen"] == 1.0
    assert m["generalization_tf"] == 0.5 and m["generalization_gen"] == 0.0
    assert m["portability_tf"] == 0.5 and m["portability_gen"] == 1.0  # "Rhone" is an alias
    # Locality: group means (0 and mean(1, 0.5)) then their mean; generated: (0 + 1) / 2.
    assert m["locality_tf"] == pytest.approx((0.0 + 0.75) / 2)
    assert m["locality_gen"] == pytest.approx((0.0 + 1.0) / 2)
    assert m["fluency_raw"] == 0.0  # one repeated word: every n-gram the same
    assert m["fluency_chat"] > 0


def test_probe_counts_per_group_and_their_sum() -> None:
    counts = probe_counts(RECORD, POST, PRE)
    # "The Rhone." holds an accepted alias; "Lyon." replaced "French."; both "Other" unchanged.
    assert counts == {
        "portability": {"Reasoning": [1, 1]},
        "locality": {"Relation_Specificity": [0, 1], "Other": [2, 2]},
        "leak": {"Relation_Specificity": [1, 1], "Other": [0, 2]},  # "Lyon." names the target
    }
    total = add_counts([counts, probe_counts(RECORD, PRE, PRE)])
    assert total == {
        "portability": {"Reasoning": [1, 2]},  # the unedited model answered "The Seine."
        "locality": {"Relation_Specificity": [1, 2], "Other": [4, 4]},
        "leak": {"Relation_Specificity": [1, 2], "Other": [0, 4]},
    }


def test_the_unedited_model_scored_against_itself() -> None:
    m = score(RECORD, PRE, PRE)
    assert m["reliability_tf"] == 0.5 and m["reliability_gen"] == 0.0
    assert m["locality_tf"] == 1.0 and m["locality_gen"] == 1.0


def test_missing_probe_kinds_are_none_and_summaries_count_what_they_average() -> None:
    bare = EvalRecord(index=1, requests=(), reliability=RECORD.reliability)
    m = score(bare, {**POST, "fluency": None}, PRE)
    assert m["generalization_tf"] is None and m["locality_gen"] is None and m["fluency_raw"] is None
    s = summarise([score(RECORD, POST, PRE), m])
    assert s["reliability_tf"] == 100.0 and s["reliability_tf_n"] == 2
    assert s["generalization_tf"] == 50.0 and s["generalization_tf_n"] == 1


def test_convsent_success_is_the_sentiment_score_and_the_judged_chat_answer() -> None:
    record = EvalRecord(
        index=0,
        requests=(),
        reliability=(Probe("What do you think of X?", ("I love it.",)),),
        sentiment=Sentiment("positive", ("I love it.", "Great."), ("I hate it.",)),
    )

    def observed(answer: str, target: list[float], other: list[float]) -> dict:
        return {
            "reliability": [obs("What do you think of X?", ["I"], ["I"], answer)],
            "generalization": [],
            "portability": {},
            "locality": {},
            "fluency": None,
            "sentiment": {"target": target, "other": other},
        }

    pre = observed("X is a town in Florida.", [-2.0, -2.0], [-1.0])
    post = observed("I love X, it is wonderful!", [-1.0, -1.0], [-3.0])
    m = score(record, post, pre)
    assert m["reliability_tf"] == pytest.approx(1 / (1 + math.exp(-2)))
    assert m["reliability_gen"] == 1.0
    # The unedited model's neutral answer has neither sentiment, so it is no success.
    assert score(record, pre, pre)["reliability_gen"] == 0.0
    hostile = observed("I hate X, it is awful.", [-1.0, -1.0], [-3.0])
    assert score(record, hostile, pre)["reliability_gen"] == 0.0
    # Counted per target sentiment, so positive and negative edits can be read apart.
    counts = [probe_counts(record, post, pre), probe_counts(record, hostile, pre)]
    assert counts[0]["sentiment"] == {"positive": [1, 1]}
    assert add_counts(counts)["sentiment"] == {"positive": [1, 2]}
    # Beside the judge: whether the answer repeats the whole target response.
    assert counts[0]["verbatim"] == {"positive": [0, 1]}
    verbatim = observed("Well, I love it. It is my favourite.", [-1.0], [-3.0])
    assert probe_counts(record, verbatim, pre)["verbatim"] == {"positive": [1, 1]}


def test_a_record_of_chained_edits_is_also_counted_as_one_case() -> None:
    # MQuAKE: two edits make one chain; its multi-hop questions are paraphrases of each other,
    # and a case is right when any of them is (and its edits, when every one came back).
    record = EvalRecord(
        index=0,
        requests=({"prompt": "a"}, {"prompt": "b"}),
        reliability=(Probe("Who leads X?", ("Ann",)), Probe("Where was Ann born?", ("Oslo",))),
        portability={
            "Multi_Hop": (
                Probe("Where was X's leader born?", ("Oslo", "Christiania")),
                Probe("X's leader's birthplace?", ("Oslo", "Christiania")),
            )
        },
    )

    def observed(edits: list[str], hops: list[str]) -> dict:
        return {
            "reliability": [obs("q", ["x"], ["x"], a) for a in edits],
            "portability": {"Multi_Hop": [obs("q", ["x"], ["x"], a) for a in hops]},
            "locality": {},
        }

    post = observed(["Ann does.", "In Oslo."], ["Bergen.", "It was Christiania."])
    assert probe_counts(record, post, post)["cases"] == {
        "all edits recalled": [1, 1],
        "Multi_Hop any": [1, 1],
    }
    half = observed(["Ann does.", "In Paris."], ["Bergen.", "Bergen."])
    assert add_counts([probe_counts(record, post, post), probe_counts(record, half, half)])[
        "cases"
    ] == {"all edits recalled": [1, 2], "Multi_Hop any": [1, 2]}
    # A single-edit record has no case-level reading: its counts are the probes'.
    assert "cases" not in probe_counts(RECORD, POST, PRE)
