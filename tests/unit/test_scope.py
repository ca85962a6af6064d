"""SERAC's trained scope classifier (memory/scope.py) and `editserve train-scope`.

Synthetic embeddings stand in for sentences: a question is its subject's vector plus its
relation's (a few relations, as ZsRE has a few templates) plus wording noise. Cosine then finds
a same-subject question on another relation nearly as similar as a paraphrase, which is the
case the trained classifier exists for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editserve.cli import main
from memory.scope import (
    EmbeddedExamples,
    ScopeClassifier,
    calibrate,
    classifier_scores,
    cosine_scores,
    pair_features,
    train,
    training_pairs,
)

DIM = 32
RELATIONS = 4


def synthetic(subjects: int, seed: int) -> EmbeddedExamples:
    """Per subject, one question on each of two relations; the other relation's question is
    the outside text. Each question has one paraphrase, worded more loosely than the question
    (so cosine rates it about as similar as the outside text)."""
    g = torch.Generator().manual_seed(seed)
    relation = torch.randn(RELATIONS, DIM, generator=torch.Generator().manual_seed(99))

    def text(s: torch.Tensor, r: int, wording: float = 0.15) -> torch.Tensor:
        v = s + 0.5 * relation[r] + wording * torch.randn(DIM, generator=g)
        return torch.nn.functional.normalize(v, dim=0)

    questions, paraphrases, outside, subject_of = [], [], [], []
    for i in range(subjects):
        s = torch.randn(DIM, generator=g)
        r1, r2 = torch.randperm(RELATIONS, generator=g)[:2].tolist()
        for mine, other in ((r1, r2), (r2, r1)):
            questions.append(text(s, mine))
            paraphrases.append(text(s, mine, wording=0.6))
            outside.append(text(s, other))
            subject_of.append(i)
    n = len(questions)
    subjects_t = torch.tensor(subject_of)
    return EmbeddedExamples(
        questions=torch.stack(questions),
        paraphrases=torch.stack(paraphrases),
        paraphrase_of=torch.arange(n),
        outside=torch.stack(outside),
        outside_of=torch.arange(n),
        same_subject=subjects_t[:, None] == subjects_t[None, :],
    )


def test_pair_features_are_symmetric() -> None:
    a, b = torch.randn(3, DIM), torch.randn(3, DIM)
    assert pair_features(a, b).shape == (3, 2 * DIM + 1)
    assert torch.equal(pair_features(a, b), pair_features(b, a))


def test_the_trained_classifier_separates_scope_better_than_cosine() -> None:
    classifier = train(synthetic(60, seed=1), epochs=40, seed=0)
    held_out = synthetic(40, seed=2)  # subjects never seen in training
    threshold, table = calibrate(classifier_scores(classifier, held_out))
    row = next(r for r in table if r["threshold"] == threshold)
    assert row["paraphrase_fires"] >= 0.95
    assert row["outside_fires"] <= 0.1 and row["other_question_fires"] <= 0.05
    # Cosine, at any threshold that keeps as many paraphrases, fires far more on outside texts.
    cosine = calibrate(cosine_scores(held_out))[1]
    kept = [r for r in cosine if r["paraphrase_fires"] >= row["paraphrase_fires"]]
    assert min(r["outside_fires"] for r in kept) >= row["outside_fires"] + 0.25


def test_a_classifier_round_trips_through_its_file(tmp_path: Path) -> None:
    classifier = train(synthetic(10, seed=3), epochs=2)
    classifier.threshold, classifier.info = 0.35, {"trained_on": 20}
    path = tmp_path / "scope.safetensors"
    classifier.save(path)
    loaded = ScopeClassifier.load(path)
    q, e = torch.randn(5, DIM), torch.randn(5, DIM)
    assert torch.equal(loaded.probability(q, e), classifier.probability(q, e))
    assert (loaded.threshold, loaded.info) == (0.35, {"trained_on": 20})
    # One query against several entries broadcasts.
    assert torch.equal(loaded.probability(q[:1], e), classifier.probability(q[:1].expand(5, -1), e))


def test_a_damaged_or_missing_file_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no scope classifier"):
        ScopeClassifier.load(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a scope classifier written by"):
        ScopeClassifier.load(bad)


# -- the command ---------------------------------------------------------------------------------

TEMPLATES = {
    "family": ("Which family does {} belong to?", "What family is {} part of?"),
    "rank": ("The taxon rank of {} is", "What is the taxon rank of {}?"),
    "country": ("Which country is {} in?", "In what country is {} located?"),
    "river": ("Which river flows through {}?", "What river runs through {}?"),
}


def knowedit_records(n: int) -> list[dict]:
    names = [f"Zorbax{i}" for i in range(n)]
    relations = list(TEMPLATES)
    out = []
    for i, name in enumerate(names):
        mine, other = relations[i % 4], relations[(i + 1) % 4]
        out.append(
            {
                "subject": name,
                "prompt": TEMPLATES[mine][0].format(name),
                "rephrase_prompt": TEMPLATES[mine][1].format(name),
                "target_new": "Quux",
                "ground_truth": ["Baz"],
                "locality": {
                    "Relation_Specificity": [
                        {"prompt": TEMPLATES[other][0].format(name), "ground_truth": ["x"]}
                    ]
                },
            }
        )
    return out


def test_train_scope_writes_a_calibrated_classifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from tests.unit.test_memory_edits_api import BagOfWords

    # train-scope passes the encoder folder setting; the stand-in needs none.
    monkeypatch.setattr("memory.encoder.SentenceEncoder", lambda *a, **k: BagOfWords())
    data = tmp_path / "zsre_train.json"  # a training file: every record may tune
    data.write_text(json.dumps(knowedit_records(80)))
    out, report = tmp_path / "scope.safetensors", tmp_path / "report.json"
    args = ["train-scope", "--data", str(data), "--out", str(out), "--skip", "10"]
    assert main([*args, "--calibrate", "20", "--epochs", "5", "--report", str(report)]) == 0
    classifier = ScopeClassifier.load(out)
    written = json.loads(report.read_text())
    assert classifier.threshold == written["threshold"]
    assert classifier.info == {
        "data": [str(data)],
        "skip": 10,
        "trained_on": 50,
        "calibrated_on": 20,
        "encoder": "float32",
    }
    assert [r["threshold"] for r in written["classifier"]] == [
        r["threshold"] for r in written["cosine"]
    ]
    assert "held-out records (20)" in capsys.readouterr().out


def test_train_scope_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps(knowedit_records(12)))
    out = tmp_path / "scope.safetensors"
    base = ["train-scope", "--data", str(data), "--out", str(out)]
    assert main([*base, "--threshold", "1.5"]) == 2
    assert "--threshold is a probability" in capsys.readouterr().err
    assert main(base) == 2
    assert "too few usable records" in capsys.readouterr().err
    absent = ["train-scope", "--data", str(tmp_path / "absent.json"), "--out", str(out)]
    assert main(absent) == 2
    assert "no data file" in capsys.readouterr().err
    assert not out.exists()


def test_records_on_one_subject_have_no_other_questions() -> None:
    data = synthetic(1, seed=4)  # one subject, two questions: neither is "another record's"
    queries, entries, labels = training_pairs(data, hard=5)
    # itself and its paraphrase (1), its outside text (0), for each question; nothing else
    assert labels.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert len(queries) == len(entries) == 6
    scores = classifier_scores(train(data, epochs=1), data)
    assert scores.other.tolist() == [0.0, 0.0]
