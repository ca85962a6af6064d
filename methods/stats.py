"""Second-moment statistics C = E[k kᵀ] of the down-projection inputs (MEMIT §3.2, AlphaEdit).

C tells a least-squares update which key directions the model uses on ordinary text, so that a
new association disturbs them as little as possible (MEMIT), or not at all (AlphaEdit projects
its update onto the directions C hardly uses).

Sources of text, each tokenised into fixed-length rows:
- a corpus file given by path (plain text; ../shared/data/corpus_wikitext holds Wikipedia);
- with none, text sampled from the served model itself (temperature 1 from the start token), so
  a fresh machine needs no dataset.

One forward pass collects every requested layer and stops after the last of them. Results are
cached on disk, keyed by the model fingerprint, the source, the sample count and the layer. They
describe the base model: the caller computes them on its pristine weights
(`editserve.edits.statistics`). `progress(done, total)`, in tokens, reports how far a
computation is.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from methods.base import EditContext
from methods.common import StopForward, first_input, forward_until_stopped

log = logging.getLogger(__name__)

SELF = "self"  # the source name for text sampled from the model
# (tokens done, tokens in all) while statistics compute
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class StatsSource:
    """Where the text comes from (`corpus` a file path, or None: sampled from the model), how
    many tokens to read and the row length."""

    corpus: str | None = None
    n_tokens: int = 20_000
    seq_len: int = 128
    seed: int = 0

    @property
    def tag(self) -> str:
        """A file-name-safe identity of the source (a corpus by its content hash)."""
        if self.corpus is None:
            name = f"{SELF}-seed{self.seed}"
        else:
            path = Path(self.corpus)
            stat = path.stat()
            name = f"{path.stem}-{_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}"
        return f"{name}-{self.n_tokens}x{self.seq_len}"


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """The file's content hash, computed once per (path, size, mtime)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def corpus_rows(ctx: EditContext, path: str, n_tokens: int, seq_len: int) -> list[list[int]]:
    """Consecutive `seq_len`-token rows of the file's text, `n_tokens` in all (or what it has)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    rows: list[list[int]] = []
    # Tokenise in chunks: a whole corpus at once is slow and memory hungry.
    chunk_chars = 200_000
    for start in range(0, len(text), chunk_chars):
        ids = ctx.tokenizer(text[start : start + chunk_chars])["input_ids"]
        rows += [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        if len(rows) * seq_len >= n_tokens:
            break
    if not rows:
        raise ValueError(f"{path} holds fewer than {seq_len} tokens of text")
    return rows[: max(1, n_tokens // seq_len)]


def sampled_moments(
    ctx: EditContext,
    layers: Sequence[int],
    n_tokens: int,
    seq_len: int,
    seed: int,
    batch: int = 64,
    progress: Progress | None = None,
) -> dict[int, torch.Tensor]:
    """E[k kᵀ] over text the model writes itself (temperature 1, each row started from its BOS
    token), accumulated while it writes: every sampled token is fed back once, so its keys are
    seen then, and no second pass is needed."""
    start = ctx.tokenizer.bos_token_id
    if start is None:
        start = ctx.tokenizer.eos_token_id
    generator = torch.Generator(device="cpu").manual_seed(seed)
    n_rows = max(1, n_tokens // seq_len)
    with (
        _Accumulator(ctx, layers, stop=False) as acc,
        tqdm(
            total=n_rows * seq_len, desc="second moments (sampling)", unit="tok", leave=False
        ) as bar,
    ):
        done = 0
        while done < n_rows:
            b = min(batch, n_rows - done)
            # A batch takes minutes on a small CPU: progress after each of its steps.
            step_done = None
            if progress is not None:

                def step_done(step: int, before: int = done * seq_len, b: int = b) -> None:
                    progress(before + b * step, n_rows * seq_len)

            _sample(ctx, start, b, seq_len, generator, step_done)
            done += b
            bar.update(b * seq_len)
    return acc.moments()


def _sample(
    ctx: EditContext,
    start: int,
    batch: int,
    length: int,
    generator: torch.Generator,
    on_step: Callable[[int], None] | None = None,
) -> None:
    from transformers import DynamicCache

    ids = torch.full((batch, 1), start, dtype=torch.long, device=ctx.device)
    cache = DynamicCache()
    with torch.inference_mode():
        for step in range(length):
            logits = (
                ctx.model(
                    input_ids=ids,
                    cache=cache,
                    use_cache=True,
                    position_ids=torch.full((batch, 1), step, device=ctx.device),
                )
                .logits[:, -1]
                .float()
            )
            probs = torch.softmax(logits, -1).cpu()
            ids = torch.multinomial(probs, 1, generator=generator).to(ctx.device)
            if on_step is not None:
                on_step(step + 1)  # steps done


class _Accumulator:
    """Forward pre-hooks summing k kᵀ (float64) at each layer's down_proj; with `stop`, the
    forward is cut short after the last of them."""

    def __init__(self, ctx: EditContext, layers: Sequence[int], stop: bool) -> None:
        self.ctx, self.layers, self.stop = ctx, sorted(set(layers)), stop
        self.sums: dict[int, torch.Tensor] = {}
        self.pending: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self.count = 0
        self.handles: list = []

    # Keys are buffered and multiplied in float32 blocks of this many rows, the sums kept in
    # float64: one small float64 product per decoding step would cost more than the model.
    BLOCK = 4096

    def _hook(self, layer: int):  # noqa: ANN202 (a torch hook)
        def grab(_: nn.Module, inputs: tuple) -> None:
            x = first_input(inputs)
            self.pending[layer].append(x.reshape(-1, x.shape[-1]).float())
            if layer == self.layers[0]:
                self.count += self.pending[layer][-1].shape[0]
            if sum(k.shape[0] for k in self.pending[layer]) >= self.BLOCK:
                self._flush(layer)
            if self.stop and layer == self.layers[-1]:
                raise StopForward  # the rest of the model never runs

        return grab

    def _flush(self, layer: int) -> None:
        if self.pending[layer]:
            k = torch.cat(self.pending[layer])
            self.sums[layer] = self.sums.get(layer, 0) + (k.T @ k).double()
            self.pending[layer] = []

    def __enter__(self) -> _Accumulator:
        arch = self.ctx.arch
        self.handles = [
            arch.down_proj(i).register_forward_pre_hook(self._hook(i)) for i in self.layers
        ]
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.remove()

    def moments(self) -> dict[int, torch.Tensor]:
        for layer in self.layers:
            self._flush(layer)
        return {layer: (self.sums[layer] / self.count).float().cpu() for layer in self.layers}


def second_moments(
    ctx: EditContext,
    layers: Sequence[int],
    rows: Iterable[Sequence[int]],
    batch: int = 16,
    progress: Progress | None = None,
) -> dict[int, torch.Tensor]:
    """E[k kᵀ] [d_in, d_in] (float32) of `down_proj(l)`'s inputs over every token of `rows`, for
    each l in `layers`, from one pass per batch that stops after the last of them."""
    rows = list(rows)
    batches = list(_batches(rows, batch))
    total, done = sum(len(b) * len(b[0]) for b in batches), 0
    with _Accumulator(ctx, layers, stop=True) as acc:
        for chunk in tqdm(batches, desc="second moments", unit="batch", leave=False):
            forward_until_stopped(ctx, torch.tensor(chunk, dtype=torch.long, device=ctx.device))
            done += len(chunk) * len(chunk[0])
            if progress is not None:
                progress(done, total)
    return acc.moments()


def _batches(rows: list, size: int) -> Iterator[list]:
    # Equal-length rows only (every source yields seq_len rows; a short corpus tail is dropped).
    width = len(rows[0])
    rows = [r for r in rows if len(r) == width]
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


class StatsCache:
    """Second moments on disk: <root>/<LAYOUT>/<fingerprint>/<source tag>/layer<l>.safetensors."""

    # Statistics cached before v2 may have been computed on an edited model (the first MEMIT
    # edit computed them on the model as it was then): a new layout leaves them unread.
    LAYOUT = "v2"

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, fingerprint: str, source: StatsSource, layer: int) -> Path:
        folder = self.root / self.LAYOUT / fingerprint[:16] / source.tag
        return folder / f"layer{layer}.safetensors"

    def cached(self, fingerprint: str, source: StatsSource, layers: Sequence[int]) -> bool:
        return all(self.path(fingerprint, source, layer).is_file() for layer in layers)

    def get(
        self,
        ctx: EditContext,
        source: StatsSource,
        layers: Sequence[int],
        progress: Progress | None = None,
    ) -> dict[int, torch.Tensor]:
        """The statistics of `layers`, computing (in one pass) and storing those not cached.
        `ctx.model` must hold the weights they should describe (the base model's)."""
        found: dict[int, torch.Tensor] = {}
        for layer in layers:
            path = self.path(ctx.model_fingerprint, source, layer)
            if path.is_file():
                found[layer] = load_file(path)["second_moment"]
        missing = [layer for layer in layers if layer not in found]
        if missing:
            log.info("computing second moments of layers %s from %s", missing, source.tag)
            if source.corpus is None:
                computed = sampled_moments(
                    ctx, missing, source.n_tokens, source.seq_len, source.seed, progress=progress
                )
            else:
                rows = corpus_rows(ctx, source.corpus, source.n_tokens, source.seq_len)
                computed = second_moments(ctx, missing, rows, progress=progress)
            for layer, moment in computed.items():
                path = self.path(ctx.model_fingerprint, source, layer)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({"second_moment": moment.contiguous()}, tmp)
                tmp.replace(path)  # atomic: a crash never leaves half a file
            found.update(computed)
        return found
