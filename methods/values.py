"""Target values: the vector δ that, added to one module's output at the subject's last token,
makes the model answer the new target in the chat context (ROME §3.1 "computing v*").

Loss = mean NLL of the target right after `ctx.chat_prompt(question)` over several context
questions + kl_factor · KL(p₀ ‖ p_δ) of the first answer token to questions about the subject
itself ("essence drift") + weight_decay · ‖δ‖²/‖v₀‖². After each Adam step ‖δ‖ is clamped to
clamp_norm_factor · ‖v₀‖, v₀ being the module's output at the subject in the bare prompt.

Cost. δ enters at the subject's last token, so no position before it can change, at any layer
(attention is causal). One no-grad pass over the whole batch records every layer's keys and
values; each step then runs only the suffix from the subject's last token on, attending to the
recorded prefix. No weight takes a gradient (weights have requires_grad False; δ is the only
leaf), and logits are computed only where the loss reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import EditContext
from methods.common import ChatSequence, causal_mask, first_input, padded


@dataclass(frozen=True)
class ValueSettings:
    steps: int
    lr: float
    kl_factor: float
    weight_decay: float
    clamp_norm_factor: float
    # The ball ‖δ‖ ≤ c·‖v₀‖ starts at c = clamp_start_factor and widens linearly to
    # clamp_norm_factor over the step budget: easy edits stop with a short δ (which leaks
    # less into unrelated keys); hard ones may still grow.
    clamp_start_factor: float
    # Stop once every target token is the argmax in every context, by this log-prob margin.
    stop_margin: float
    stop_on_prompt: bool = False  # check the stop rule on the bare prompt only


@dataclass
class ValueResult:
    delta: torch.Tensor  # [d_out] added to the module's output
    v0_norm: float
    steps: int
    nll: float
    reached: bool  # the stop rule held (else the step budget ran out)


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


def _output_tensor(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output: torch.Tensor | tuple, new: torch.Tensor) -> torch.Tensor | tuple:
    return (new, *output[1:]) if isinstance(output, tuple) else new


class SuffixReplay:
    """A batch of chat sequences, ready to be re-run with δ added at each row's subject.

    The constructor runs the whole batch once without grad, recording every layer's keys and
    values (`_PrefixKV`), the inputs of `down_proj(key_layer)` at every position (`keys`) and the
    output of `delta_module` at row 0's subject (`v0`). `hidden(delta)` then runs only the
    suffixes ids[b, subject_b:], with δ added to `delta_module`'s output at their first token.
    """

    def __init__(
        self,
        ctx: EditContext,
        key_layer: int,
        delta_module: nn.Module,
        seqs: Sequence[ChatSequence],
    ) -> None:
        self.ctx, self.delta_module = ctx, delta_module
        dev = ctx.device
        ids, self.lengths = padded([s.ids for s in seqs], ctx.tokenizer.pad_token_id or 0)
        ids, self.lengths = ids.to(dev), self.lengths.to(dev)
        batch, width = ids.shape
        self.subject = torch.tensor([s.subject_pos for s in seqs], device=dev)  # [B]
        self.answer = torch.tensor([s.answer_pos for s in seqs], device=dev)  # [B]
        captured: dict[str, torch.Tensor] = {}

        def grab_keys(_: nn.Module, inputs: tuple) -> None:
            captured["keys"] = first_input(inputs).detach()

        def grab_v0(_: nn.Module, __: tuple, output: torch.Tensor | tuple) -> None:
            captured["v0"] = _output_tensor(output)[0, self.subject[0]].detach()

        self.prefix = _PrefixKV()
        handles = [
            ctx.arch.down_proj(key_layer).register_forward_pre_hook(grab_keys),
            delta_module.register_forward_hook(grab_v0),
        ]
        try:
            with torch.inference_mode(False), torch.no_grad():
                self.full_hidden = ctx.model.base_model(
                    input_ids=ids,
                    attention_mask=causal_mask(batch, width, dev),
                    position_ids=torch.arange(width, device=dev).expand(batch, width),
                    cache=self.prefix,
                    use_cache=True,
                ).last_hidden_state  # [B, T, d]
        finally:
            for handle in handles:
                handle.remove()
        self.prefix.recording = False
        self.keys, self.v0 = captured["keys"], captured["v0"]  # [B, T, d_in], [d_out]

        # Row b's suffix is ids[b, subject_b:], right-padded to S; δ enters at its column 0.
        span = int((self.lengths - self.subject).max())
        self.cols = self.subject[:, None] + torch.arange(span, device=dev)  # [B, S]
        self.suffix = ids.gather(1, self.cols.clamp(max=width - 1))
        sees_prefix = torch.arange(width, device=dev)[None, :] < self.subject[:, None]  # [B, T]
        causal = torch.ones(span, span, dtype=torch.bool, device=dev).tril()
        self.mask = torch.cat(
            [sees_prefix[:, None, :].expand(batch, span, width), causal.expand(batch, span, span)],
            dim=2,
        )[:, None]  # [B, 1, S, T+S]

    def keep_rows(self, n: int) -> None:
        """Re-run only the first n rows from now on (the others served their keys)."""
        for cache in (self.prefix.keys, self.prefix.values):
            for layer in cache:
                cache[layer] = cache[layer][:n]
        self.suffix, self.cols, self.mask = self.suffix[:n], self.cols[:n], self.mask[:n]

    def hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, S, d] of the suffixes with δ [d_out] added at column 0;
        column j of row b is position subject_b + j."""

        def add_delta(
            _: nn.Module, __: tuple, output: torch.Tensor | tuple
        ) -> torch.Tensor | tuple:
            out = _output_tensor(output)  # [B, S, d_out]
            first = out[:, :1] + delta.to(out.dtype)
            return _replace_output(output, torch.cat([first, out[:, 1:]], dim=1))

        handle = self.delta_module.register_forward_hook(add_delta)
        try:
            with torch.inference_mode(False):
                return self.ctx.model.base_model(
                    input_ids=self.suffix,
                    attention_mask=self.mask,
                    position_ids=self.cols,
                    cache=self.prefix,
                    use_cache=True,
                ).last_hidden_state
        finally:
            handle.remove()


def optimise_value(
    ctx: EditContext,
    replay: SuffixReplay,
    n_rewrites: int,
    answer: Sequence[int],
    settings: ValueSettings,
) -> ValueResult:
    """δ for one request: `replay`'s first `n_rewrites` rows are contexts followed by `answer`
    (teacher-forced); the others are essence questions about the subject."""
    dev, head, m = ctx.device, ctx.arch.lm_head, len(answer)
    if not settings.kl_factor:
        replay.keep_rows(n_rewrites)  # essence rows serve no loss: skip their compute
    with torch.inference_mode(False):
        rows = torch.arange(replay.cols.shape[0], device=dev)
        answer_cols = replay.answer - replay.subject  # [B], suffix coordinates
        es_rows = rows[n_rewrites:]
        tgt_rows = rows[:n_rewrites].repeat_interleave(m)  # [n_rw·m]
        tgt_cols = (answer_cols[:n_rewrites, None] + torch.arange(m, device=dev)).reshape(-1)
        tgt = torch.tensor(list(answer), device=dev).repeat(n_rewrites)  # [n_rw·m]
        with torch.no_grad():
            full = replay.full_hidden
            ref_logp = F.log_softmax(head(full[es_rows, replay.answer[es_rows]]).float(), -1)

        v0_norm = float(replay.v0.norm())
        start, end = settings.clamp_start_factor, settings.clamp_norm_factor
        delta = torch.zeros_like(replay.v0, dtype=torch.float32, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=settings.lr)
        step, nll, reached = 0, float("nan"), False
        with torch.enable_grad():
            for step in range(settings.steps + 1):  # noqa: B007 (read after the loop)
                hidden = replay.hidden(delta)  # [B, S, d]
                logp = F.log_softmax(head(hidden[tgt_rows, tgt_cols]).float(), -1)  # [N, V]
                tok_logp = logp.gather(1, tgt[:, None])[:, 0]  # [n_rw·m]
                loss = -tok_logp.mean()
                nll = float(loss.detach())
                k = m if settings.stop_on_prompt else len(tgt)  # row 0 is the bare prompt
                reached = _all_argmax(logp[:k], tok_logp[:k], tgt[:k], settings.stop_margin)
                if reached or step == settings.steps:
                    break
                if settings.kl_factor and len(es_rows):
                    now = F.log_softmax(head(hidden[es_rows, answer_cols[es_rows]]).float(), -1)
                    kl = F.kl_div(now, ref_logp, log_target=True, reduction="batchmean")
                    loss = loss + settings.kl_factor * kl
                if settings.weight_decay:
                    loss = loss + settings.weight_decay * delta.pow(2).sum() / v0_norm**2
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    grown = min(1.0, (step + 1) / max(1, settings.steps - 1))
                    max_norm = (start + (end - start) * grown) * v0_norm
                    norm = delta.norm()
                    if norm > max_norm:
                        delta.mul_(max_norm / norm)
    return ValueResult(delta=delta.detach(), v0_norm=v0_norm, steps=step, nll=nll, reached=reached)


def _all_argmax(
    logp: torch.Tensor, tok_logp: torch.Tensor, tgt: torch.Tensor, margin: float
) -> bool:
    """Every target token beats every other token by `margin` (log-prob)."""
    others = logp.detach().scatter(1, tgt[:, None], float("-inf")).amax(1)  # [N]
    return bool((tok_logp.detach() - others >= margin).all())
