"""Reading every benchmark format into records: hand-made files here, the real ones when
../shared/data is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editserve.eval.datasets import answers, guess_subject, load

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return path


def test_answer_shapes_flatten_to_aliases() -> None:
    assert answers("Paris") == ("Paris",)
    assert answers(["genus"]) == ("genus",)
    assert answers([["Syria", "sy"], ["Syrie"]]) == ("Syria", "sy", "Syrie")
    assert answers(None) == ()


def test_knowedit_zsre_record(tmp_path: Path) -> None:
    rec = {
        "subject": "Epaspidoceras",
        "target_new": "Noctuidae",
        "prompt": "Which family does Epaspidoceras belong to?",
        "ground_truth": ["Aspidoceratidae"],
        "rephrase_prompt": "What family are Epaspidoceras?",
        "locality": {
            "Relation_Specificity": [{"prompt": "Rank of it is", "ground_truth": ["genus"]}]
        },
        "portability": {"Reasoning": [{"prompt": "Common name?", "ground_truth": "Owlet moths"}]},
    }
    name, [r] = load(write(tmp_path, [rec]))
    assert name == "knowedit"
    assert r.requests[0] == {
        "prompt": rec["prompt"],
        "subject": "Epaspidoceras",
        "target_new": "Noctuidae",
        "target_true": "Aspidoceratidae",
    }
    assert [p.prompt for p in r.generalization] == ["What family are Epaspidoceras?"]
    assert r.portability["Reasoning"][0].answers == ("Owlet moths",)
    assert r.locality["Relation_Specificity"][0].answers == ("genus",)


def test_counterfact_rome_format(tmp_path: Path) -> None:
    rec = {
        "requested_rewrite": {
            "prompt": "{} originates from",
            "subject": "Spike Hughes",
            "target_new": {"str": "Philadelphia"},
            "target_true": {"str": "London"},
        },
        "paraphrase_prompts": ["Spike Hughes was born in"],
        "neighborhood_prompts": ["Max Mosley originates from", "A B originates from"],
        "portability": {"New Question": "Food of his city?", "New Answer": "Cheesesteaks"},
        "alternative_subject": "Patrick Hughes",
    }
    name, [r] = load(write(tmp_path, [rec]), max_probes=1)
    assert name == "counterfact_rome"
    assert r.requests[0]["prompt"] == "Spike Hughes originates from"
    assert r.locality == {"Neighborhood": r.locality["Neighborhood"]}
    assert [(p.prompt, p.answers) for p in r.locality["Neighborhood"]] == [
        ("Max Mosley originates from", ("London",))
    ]
    assert r.portability["Subject_Aliasing"][0].prompt == "Patrick Hughes originates from"


def test_zsre_mend_format_with_inverse_relation(tmp_path: Path) -> None:
    rec = {
        "subject": "Claire Clairmont",
        "src": "Who is Claire Clairmont's sister?",
        "alt": "Marian Clairmont",
        "answers": ["Mary Shelley"],
        "rephrase": "Who's Claire Clairmont's sister?",
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
        "inverse question": "Who is Marian Clairmont's sister?",
    }
    name, [r] = load(write(tmp_path, [rec]))
    assert name == "zsre_mend"
    assert r.portability["Inverse_Relation"][0].answers == ("Claire Clairmont",)
    assert r.locality["NQ"][0].prompt == "Who wrote hamlet?"


def test_sanitation_erases_with_a_refusal(tmp_path: Path) -> None:
    data = {
        "success": [
            {
                "question": "Who wrote The Hobbit?",
                "ground_truth": "Tolkien",
                "target_new": "I don't know.",
            }
        ],
        "locality": [{"question": f"Question {i}?", "ground_truth": str(i)} for i in range(5)],
    }
    name, [r] = load(write(tmp_path, data))
    assert name == "sanitation" and r.kind == "erase"
    assert r.requests[0]["subject"] == "The Hobbit"
    assert len(r.locality["Knowledge_Retained"]) == 2


def test_convsent_draws_the_sentiment_with_the_seed(tmp_path: Path) -> None:
    recs = [{"ent": f"Topic{i}", "pos": [" good "], "neg": [" bad "]} for i in range(20)]
    path = write(tmp_path, recs)
    first = [r.sentiment.target for r in load(path, seed=1)[1]]
    assert first == [r.sentiment.target for r in load(path, seed=1)[1]]
    assert {"positive", "negative"} == set(first)
    r = load(path, seed=1)[1][0]
    assert r.requests[0]["target_new"] == ("good" if r.sentiment.target == "positive" else "bad")


def test_mquake_edits_every_rewrite_and_ports_to_the_multi_hop_question(tmp_path: Path) -> None:
    rec = {
        "requested_rewrite": [
            {
                "prompt": "{} was performed by",
                "subject": "Hey Jude",
                "question": "Who performed Hey Jude?",
                "target_new": {"str": "Madonna"},
                "target_true": {"str": "The Beatles"},
            },
        ],
        "questions": ["Where was the performer of Hey Jude born?"],
        "new_answer": "Bay City",
        "new_answer_alias": ["Bay City, Michigan"],
        "single_hops": [
            {"question": "Who performed Hey Jude?", "answer": "The Beatles"},
            {"question": "Where were they born?", "answer": "Liverpool"},
        ],
        "new_single_hops": [
            {"question": "Who performed Hey Jude?", "answer": "Madonna"},
            {"question": "Where was she born?", "answer": "Liverpool"},
        ],
    }
    name, [r] = load(write(tmp_path, [rec]))
    assert name == "mquake"
    assert r.generalization[0].prompt == "Hey Jude was performed by"
    assert r.portability["Multi_Hop"][0].answers == ("Bay City", "Bay City, Michigan")
    assert [p.prompt for p in r.locality["Unchanged_Hops"]] == ["Where were they born?"]


def test_guess_subject_occurs_in_the_question() -> None:
    assert guess_subject("Which river flows through Paris?") == "Paris"
    assert guess_subject("What sort of creature is a killdeer?") == "killdeer"
    assert guess_subject("A seriema is what type of creature?") == "seriema"
    assert guess_subject("What type of creature is the Australian currawong?") == (
        "Australian currawong"
    )
    assert guess_subject("For what commodity is Alkmaar in Holland famous?") == "Alkmaar"
    q = "what colour is a ripe banana?"
    assert guess_subject(q) in q


def test_unknown_fields_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unrecognised record fields"):
        load(write(tmp_path, [{"question": "?"}]))


SHARED_FILES = [
    ("knowedit/zsre/ZsRE-test-all.dev.json", "knowedit"),
    ("knowedit/wiki_recent/recent_train.dev.json", "knowedit"),
    ("knowedit/wiki_counterfact/test_cf.dev.json", "knowedit"),
    ("knowedit/wikibio/wikibio-test-all.dev.json", "wikibio"),
    ("knowedit/convsent/blender_test.dev.json", "convsent"),
    ("knowedit/sanitation/trivia_qa_test.dev.json", "sanitation"),
    ("counterfact/easyedit_format/counterfact-edit.dev.json", "counterfact_easyedit"),
    ("counterfact/rome_format/counterfact_portability_gpt4.dev.json", "counterfact_rome"),
    ("zsre_mend_format/zsre_mend_eval_portability_gpt4.dev.json", "zsre_mend"),
    ("mquake/MQuAKE-hard.dev.json", "mquake"),
]


@pytest.mark.parametrize(("relative", "expected"), SHARED_FILES)
def test_the_shared_files_load(relative: str, expected: str) -> None:
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data holds the benchmark files)")
    name, records = load(path, n=50)
    assert name == expected and len(records) == 50
    for r in records:
        assert r.requests and r.reliability
        assert all(q["subject"] in q["prompt"] for q in r.requests)
