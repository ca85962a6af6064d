"""Shared fixtures: tiny random models with a byte-level tokenizer, built here, no downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from editserve.modelstore import LoadedModel

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (256) plus ChatML's specials: real multi-byte decoding, tiny vocab."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_model(kind: str = "llama", seed: int = 0, max_len: int = 256) -> LoadedModel:
    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_len,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=max_len,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
    elif kind == "gpt_neox":
        config = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_len,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPTNeoXForCausalLM(config)
    else:
        raise ValueError(kind)
    model.eval().requires_grad_(False)
    return LoadedModel(name=f"tiny-{kind}", model=model, tokenizer=tokenizer, source=Path("."))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _test_clients_call_from_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """starlette's TestClient calls from the host "testclient", which is no address, so the
    loopback-only edit routes (no admin key) would refuse it. Tests stand for a local client:
    127.0.0.1, unless a test passes `client=(host, port)` itself."""
    from starlette.testclient import TestClient

    init = TestClient.__init__

    def from_loopback(self: TestClient, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("client", ("127.0.0.1", 50000))
        init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TestClient, "__init__", from_loopback)


def build_test_app(loaded: LoadedModel, state_dir: Path, **settings: object):  # noqa: ANN201
    """The whole server (engine, journal replayed, edits, API) around `loaded`."""
    from editserve.api.app import build_app
    from editserve.config import Settings
    from editserve.edits.journal import Journal
    from editserve.edits.service import EditService
    from editserve.engine.transformers_engine import TransformersEngine
    from editserve.metrics import ServerMetrics

    metrics = ServerMetrics()
    config = Settings(state_dir=state_dir, **settings)
    engine = TransformersEngine.from_settings(loaded, config, on_step=metrics.on_step)
    edits = EditService(engine, Journal(state_dir))
    edits.replay()
    return build_app(config, engine, metrics, edits)
