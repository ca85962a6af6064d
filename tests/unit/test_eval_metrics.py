"""The evaluation's metric functions on hand-made cases whose answers are worked out here."""

from __future__ import annotations

import math

import pytest

from editserve.eval.metrics import (
    agreement,
    contains_answer,
    grouped_mean,
    judged_sentiment,
    ngram_entropy,
    normalize,
    sentiment_edit_success,
    token_accuracy,
    word_tokenize,
)


def test_normalize_drops_case_punctuation_and_articles() -> None:
    assert normalize("The  Eiffel-Tower, in PARIS!") == "eiffel tower in paris"


@pytest.mark.parametrize(
    ("answer", "accepted", "expected"),
    [
        ("The capital of France is Paris.", ["Paris"], True),
        ("It is the United States of America.", ["USA", "United States of America"], True),
        ("Parisian food is good.", ["Paris"], False),  # whole words only
        ("I don't know.", ["I don't know."], True),
        ("Lyon", ["Paris"], False),
        ("anything", [""], False),  # an empty accepted answer matches nothing
    ],
)
def test_contains_answer(answer: str, accepted: list[str], expected: bool) -> None:
    assert contains_answer(answer, accepted) is expected


def test_token_accuracy_is_the_share_of_argmax_tokens() -> None:
    # "Joe Biden" -> "Trump Biden": one of two tokens right is 0.5, not 0 (EasyEdit's #390).
    assert token_accuracy([False, True]) == 0.5
    assert token_accuracy([True, True, False]) == pytest.approx(2 / 3)
    assert token_accuracy([]) == 0.0


def test_agreement_counts_positions_and_length_changes() -> None:
    assert agreement([" Paris", "."], [" Paris", "."]) == 1.0
    assert agreement([" Paris", "."], [" Rome", "."]) == 0.5
    assert agreement([" a", " b"], [" a"]) == 0.5  # a missing position disagrees
    assert agreement([], []) == 1.0


def test_grouped_mean_averages_groups_not_probes() -> None:
    # KnowEdit: the mean over groups of each group's mean (3 probes in one group weigh as 1).
    assert grouped_mean({"Reasoning": [1.0, 1.0, 1.0], "Subject_Aliasing": [0.0]}) == 0.5
    assert grouped_mean({}) is None


def test_word_tokenize_splits_like_treebank() -> None:
    assert word_tokenize("I don't know.") == ["I", "do", "n't", "know", "."]
    assert word_tokenize("It's 3.5 km, isn't it?") == [
        "It",
        "'s",
        "3.5",
        "km",
        ",",
        "is",
        "n't",
        "it",
        "?",
    ]


def test_ngram_entropy_matches_a_hand_computation() -> None:
    # "a b a b": bigrams ab ×2, ba ×1 -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected)


def test_ngram_entropy_is_low_for_repetition_and_zero_when_too_short() -> None:
    varied = "the cat sat on the mat while a dog slept by the warm fire in the hall"
    repeated = "mezzo soprano, " * 8
    assert ngram_entropy(repeated) < ngram_entropy(varied)
    assert ngram_entropy("one") == 0.0


def test_sentiment_edit_success() -> None:
    # Target sentiment preferred by 2 nats, topic likelihood unchanged: sigmoid(2) · 1.
    assert sentiment_edit_success(-1.0, -3.0, -1.0) == pytest.approx(1 / (1 + math.exp(-2)))
    # Target responses became less likely about the topic (by 1 nat): scaled by e^-1.
    assert sentiment_edit_success(-2.0, -2.0, -1.0) == pytest.approx(0.5 * math.exp(-1))
    # More likely than before: capped at 1.
    assert sentiment_edit_success(-0.5, -0.5, -1.0) == pytest.approx(0.5)


def test_judged_sentiment_reads_polarity_and_leaves_facts_neutral() -> None:
    assert judged_sentiment("I love it, it is a wonderful place!") == "positive"
    assert judged_sentiment("I hate it. The food was awful.") == "negative"
    assert judged_sentiment("Estero is a village in Lee County, Florida.") == "neutral"
    # Negation is read, not just words: "not good" is not positive.
    assert judged_sentiment("It is not good at all.") == "negative"
