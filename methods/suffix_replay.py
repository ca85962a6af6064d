"""A batch of chat sequences recorded once, then re-run from each row's subject with a vector δ
added to one module's output there: the forward that every step of a value optimisation
(`methods.value_optimiser`, GRACE's value training) repeats.

Cost. δ enters at the subject's last token, so no position before it can change, at any layer
(attention is causal). One no-grad pass over the whole batch records every layer's keys and
values; each step then runs only the suffix from the subject's last token on, attending to the
recorded prefix. No weight takes a gradient (weights have requires_grad False; δ is the only
leaf), and logits are computed only where the loss reads them.

Nor can δ change any block below the one it enters, at any position: with `from_block` the
recording pass also keeps that block's output, and each step starts from it (δ added at the
subject), running only the blocks above. For MEMIT's last layer (7 of 30) that is 8 blocks of
every step's forward saved, ~15 % of a step. It holds when nothing but δ changes the module's
output during the steps (not GRACE, whose codebook acts there), and when the model's blocks take
`inputs_embeds` unchanged (llama-like ones do; GPT-2 adds position embeddings): the replay
checks the shortcut against its own recording and falls back to the full suffix if they differ.

Large batches (MEMIT with 100 requests is 300 rows) run in chunks of rows of similar length, each
padded only to its own longest row: the recording pass and every step's forward and backward
(gradients accumulate, so the result is the same). Padding to the longest row of the whole batch
wasted a third of the work, and one pass over all rows held ~10 GB of activations.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import EditContext
from methods.common import ChatSequence, causal_mask, first_input, first_output, padded
from methods.workbench import hooks

log = logging.getLogger(__name__)

# Tokens per chunk (rows × padded length) in a replay's passes. ~1 MB of activations per token
# when the backward runs through 20-odd layers of a 576-wide model.
CHUNK_TOKENS = 1024
# Relative difference up to which the shortcut above δ's block counts as the same forward: room
# for rounding; a family that transforms its blocks' input (GPT-2's position embeddings) is
# off by far more, and falls back (a unit test).
SHORTCUT_TOLERANCE = 1e-2


class _PrefixKV:
    """The `cache` transformers' attention layers see (they call only `update`).

    Recording: keeps each layer's keys and values of a full no-grad pass. Replaying: returns
    them with the new ones appended, storing nothing, so every step starts from the same prefix.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording = True
        self.width = 0

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key, value: [B, kv_heads, T, head_dim]
        if self.recording:
            self.keys[layer_idx], self.values[layer_idx] = key.detach(), value.detach()
            self.width = key.shape[2]
            return key, value
        return (
            torch.cat([self.keys[layer_idx], key], dim=2),
            torch.cat([self.values[layer_idx], value], dim=2),
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.recording else self.width


def _replace_output(output: torch.Tensor | tuple, new: torch.Tensor) -> torch.Tensor | tuple:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def length_chunks(lengths: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Row indices [lengths.numel()] split into chunks of similar length: rows sorted by length,
    each chunk as many as fit `budget` tokens when padded to its longest (at least one row)."""
    chunks: list[list[int]] = [[]]
    for length, row in zip(*(t.tolist() for t in lengths.sort(stable=True)), strict=True):
        if chunks[-1] and (len(chunks[-1]) + 1) * length > budget:
            chunks.append([])
        chunks[-1].append(row)
    return [torch.tensor(c, dtype=torch.long, device=lengths.device) for c in chunks]


def _pad_to(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """x zero-padded along `dim` to `width`."""
    shape = list(x.shape)
    shape[dim] = width - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


@dataclass
class _Recorded:
    """What one chunk's recording pass keeps (rows in chunk order, cut to the chunk's width)."""

    prefix: _PrefixKV
    hidden: torch.Tensor  # [b, t, d]
    keys: torch.Tensor  # [b, t, d_in]
    v0: torch.Tensor  # [b, d_out]
    block_out: torch.Tensor | None  # [b, t, d]: the residual after the δ module's block


class SuffixReplay:
    """A batch of chat sequences, ready to be re-run with δ added at each row's subject.

    The constructor runs the whole batch once without grad, in chunks of similar length,
    recording every layer's keys and values (`_PrefixKV`), the inputs of `down_proj(key_layer)`
    at every position (`keys`), the final hidden states (`full_hidden`) and the output of
    `delta_module` at each row's subject (`v0`). `hidden(delta)` then runs only the suffixes
    ids[b, subject_b:], with δ added to `delta_module`'s output at their first token.

    `from_block`: each step runs only the blocks above `delta_module`'s, from its recorded
    output (module docstring); `self.from_block` says whether the shortcut is in use.
    """

    def __init__(
        self,
        ctx: EditContext,
        key_layer: int,
        delta_module: nn.Module,
        seqs: Sequence[ChatSequence],
        chunk_tokens: int = CHUNK_TOKENS,
        from_block: bool = False,
    ) -> None:
        self.ctx, self.delta_module = ctx, delta_module
        self.block = _block_of(ctx, delta_module) if from_block else None
        dev = ctx.device
        ids, self.lengths = padded([s.ids for s in seqs], ctx.tokenizer.pad_token_id or 0)
        ids, self.lengths = ids.to(dev), self.lengths.to(dev)
        width = ids.shape[1]
        self.subject = torch.tensor([s.subject_pos for s in seqs], device=dev)  # [B]
        self.answer = torch.tensor([s.answer_pos for s in seqs], device=dev)  # [B]

        chunks = length_chunks(self.lengths, chunk_tokens)
        parts = [self._record(key_layer, ids[rows], self.lengths[rows], rows) for rows in chunks]
        back = torch.cat(chunks).argsort()  # chunk order -> row order

        def joined(tensors: list[torch.Tensor], dim: int | None = None) -> torch.Tensor:
            if dim is not None:
                tensors = [_pad_to(t, width, dim) for t in tensors]
            return torch.cat(tensors)[back]

        self.prefix = _PrefixKV()
        self.prefix.recording, self.prefix.width = False, width
        for layer in parts[0].prefix.keys:
            self.prefix.keys[layer] = joined([p.prefix.keys[layer] for p in parts], 2)
            self.prefix.values[layer] = joined([p.prefix.values[layer] for p in parts], 2)
        self.full_hidden = joined([p.hidden for p in parts], 1)  # [B, T, d]
        self.keys = joined([p.keys for p in parts], 1)  # [B, T, d_in]
        self.v0 = joined([p.v0 for p in parts])  # [B, d_out]

        # Row b's suffix is ids[b, subject_b:], right-padded to S; δ enters at its column 0.
        span = int(self.suffix_lengths().max())
        self.cols = self.subject[:, None] + torch.arange(span, device=dev)  # [B, S]
        self.suffix = ids.gather(1, self.cols.clamp(max=width - 1))
        self.sees_prefix = torch.arange(width, device=dev)[None, :] < self.subject[:, None]
        self.block_in: torch.Tensor | None = None  # [B, S, d]: the suffix's recorded block output
        self.from_block = False
        if self.block is not None:
            block_out = joined([p.block_out for p in parts if p.block_out is not None], 1)
            at = self.cols.clamp(max=width - 1)[..., None].expand(-1, -1, block_out.shape[-1])
            self.block_in = block_out.gather(1, at)
            self.from_block = self._shortcut_agrees()
            if self.from_block:  # the blocks up to δ's are never run again
                for layer in range(self.block + 1):
                    self.prefix.keys.pop(layer, None)
                    self.prefix.values.pop(layer, None)

    def _record(
        self, key_layer: int, ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor
    ) -> _Recorded:
        """The no-grad pass over some rows, cut to their longest."""
        ctx, dev = self.ctx, ids.device
        ids = ids[:, : int(lengths.max())]
        batch, width = ids.shape
        subject = self.subject[rows]
        captured: dict[str, torch.Tensor] = {}

        def grab_keys(_: nn.Module, inputs: tuple) -> None:
            captured["keys"] = first_input(inputs).detach()

        def grab_v0(_: nn.Module, __: tuple, output: torch.Tensor | tuple) -> None:
            at = torch.arange(batch, device=dev)
            captured["v0"] = first_output(output)[at, subject].detach()

        def grab_block(_: nn.Module, __: tuple, output: torch.Tensor | tuple) -> None:
            captured["block"] = first_output(output).detach()

        prefix = _PrefixKV()
        handles = [
            ctx.arch.down_proj(key_layer).register_forward_pre_hook(grab_keys),
            self.delta_module.register_forward_hook(grab_v0),
        ]
        if self.block is not None:
            handles.append(ctx.arch.layers[self.block].register_forward_hook(grab_block))
        with hooks(handles), torch.inference_mode(False), torch.no_grad():
            hidden = ctx.model.base_model(
                input_ids=ids,
                attention_mask=causal_mask(batch, width, dev),
                position_ids=torch.arange(width, device=dev).expand(batch, width),
                cache=prefix,
                use_cache=True,
            ).last_hidden_state
        return _Recorded(prefix, hidden, captured["keys"], captured["v0"], captured.get("block"))

    def _shortcut_agrees(self) -> bool:
        """Whether starting above δ's block reproduces the recorded final states (δ = 0) of a
        few rows; where a family's blocks do not take `inputs_embeds` as they are, it does not."""
        rows = torch.arange(min(4, len(self.subject)), device=self.subject.device)
        part = self.rows(rows)
        part.from_block = True
        with torch.no_grad():
            got = part.hidden(torch.zeros_like(self.v0[rows]))
        want = self.full_hidden[rows[:, None], part.cols.clamp(max=self.full_hidden.shape[1] - 1)]
        real = (part.cols < part.lengths[:, None])[..., None]
        err = ((got - want) * real).norm() / (want * real).norm().clamp_min(1e-12)
        agrees = bool(err <= SHORTCUT_TOLERANCE)
        if not agrees:
            log.info("suffix replay: blocks above %d do not start from its output", self.block)
        return agrees

    def suffix_lengths(self) -> torch.Tensor:
        """[B]: the real (unpadded) length of each row's suffix."""
        return self.lengths - self.subject

    def rows(self, keep: torch.Tensor) -> SuffixReplay:
        """A replay of only the rows `keep` [n] (sharing everything recorded), its suffix and
        prefix cut to those rows' longest."""
        span = int(self.suffix_lengths()[keep].max())
        width = int(self.subject[keep].max())  # a row's prefix is the positions before its subject
        part = copy.copy(self)
        part.prefix = _PrefixKV()
        part.prefix.recording, part.prefix.width = False, width
        part.prefix.keys = {i: t[keep, :, :width] for i, t in self.prefix.keys.items()}
        part.prefix.values = {i: t[keep, :, :width] for i, t in self.prefix.values.items()}
        part.lengths, part.subject, part.answer = (
            self.lengths[keep],
            self.subject[keep],
            self.answer[keep],
        )
        part.suffix, part.cols = self.suffix[keep, :span], self.cols[keep, :span]
        part.sees_prefix = self.sees_prefix[keep, :width]
        if self.block_in is not None:
            part.block_in = self.block_in[keep, :span]
        return part

    def hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, S, d] of the suffixes with δ added at column 0 (δ: [d_out] for
        every row or [B, d_out] one per row); column j of row b is position subject_b + j."""
        batch, span = self.suffix.shape
        causal = torch.ones(span, span, dtype=torch.bool, device=self.suffix.device).tril()
        mask = torch.cat(
            [
                self.sees_prefix[:, None, :].expand(batch, span, self.prefix.width),
                causal.expand(batch, span, span),
            ],
            dim=2,
        )[:, None]  # [B, 1, S, T+S]
        if self.from_block:
            return self._hidden_above_block(delta, mask)

        def add_delta(
            _: nn.Module, __: tuple, output: torch.Tensor | tuple
        ) -> torch.Tensor | tuple:
            out = first_output(output)  # [B, S, d_out]
            first = out[:, 0] + delta.to(out.dtype)
            return _replace_output(output, torch.cat([first[:, None], out[:, 1:]], dim=1))

        with hooks([self.delta_module.register_forward_hook(add_delta)]):
            return self._forward(mask, input_ids=self.suffix)

    def _forward(self, mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """The model's final hidden states for the suffix (`input_ids` or `inputs_embeds`),
        attending to the recorded prefix."""
        with torch.inference_mode(False):
            return self.ctx.model.base_model(
                **inputs,
                attention_mask=mask,
                position_ids=self.cols,
                cache=self.prefix,
                use_cache=True,
            ).last_hidden_state

    def _hidden_above_block(self, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`hidden` run from the recorded output of δ's block: the model's own forward (rotary
        positions, mask, final norm) over a layer list cut to the blocks above it. The cut is on
        the workbench's module tree, which only the edit in progress uses."""
        assert self.block_in is not None and self.block is not None
        start = self.block_in[:, :1] + delta.to(self.block_in.dtype).reshape(-1, 1, delta.shape[-1])
        embeds = torch.cat([start, self.block_in[:, 1:]], dim=1)
        owner_path, _, attr = self.ctx.arch.spec.layers.rpartition(".")
        owner = self.ctx.model.get_submodule(owner_path)
        layers = getattr(owner, attr)
        setattr(owner, attr, nn.ModuleList(list(layers)[self.block + 1 :]))
        try:
            return self._forward(mask, inputs_embeds=embeds)
        finally:
            setattr(owner, attr, layers)


def _block_of(ctx: EditContext, module: nn.Module) -> int:
    """The index of the block holding `module`."""
    for i, block in enumerate(ctx.arch.layers):
        if any(m is module for m in block.modules()):
            return i
    raise ValueError("the δ module is in none of the model's blocks")
