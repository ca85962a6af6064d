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
    # Stop once every target token is the argmax in every context, by this log-prob margin.
    stop_margin: float
    # "adam", or "normalized": steps of length lr·‖v₀‖ along the gradient (Adam's sign-like
    # steps spread δ over every coordinate, and a longer δ leaks more into unrelated tokens).
    optimizer: str = "adam"
    # Scope: unrelated chats get scope_leak · δ added at every token (a stand-in for what the
    # rank-one update leaks into other keys); their next-token KL is weighted by scope_factor.
    scope_factor: float = 0.0
    scope_leak: float = 0.1


@dataclass
class ValueResult:
    delta: torch.Tensor  # [d_out] added to the module's output
    keys: torch.Tensor  # [B, T, d_in] inputs of down_proj(key_layer), every position
    lengths: torch.Tensor  # [B] real length of each row of `keys`
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

    def hidden(self, delta: torch.Tensor, coef: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, S, d] of the suffixes; column j of row b is position
        subject_b + j. δ [d_out] is added at column 0, or coef[b, j] · δ everywhere."""

        def add_delta(
            _: nn.Module, __: tuple, output: torch.Tensor | tuple
        ) -> torch.Tensor | tuple:
            out = _output_tensor(output)  # [B, S, d_out]
            if coef is not None:
                return _replace_output(output, out + coef[..., None] * delta.to(out.dtype))
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
    key_layer: int,
    delta_module: nn.Module,
    rewrites: Sequence[ChatSequence],
    essence: Sequence[ChatSequence],
    settings: ValueSettings,
    scope: Sequence[ChatSequence] = (),
) -> ValueResult:
    """δ for one request. `rewrites` all carry the same answer; `essence` carry none; `scope`
    rows are unrelated chats whose `subject_pos` marks where they start to differ."""
    use_scope = bool(settings.scope_factor and scope)
    seqs = [*rewrites, *essence, *(scope if use_scope else ())]
    n_rw, n_es, m = len(rewrites), len(essence), len(rewrites[0].answer)
    dev, head = ctx.device, ctx.arch.lm_head
    with torch.inference_mode(False):
        replay = SuffixReplay(ctx, key_layer, delta_module, seqs)
        answer = torch.tensor([s.answer_pos for s in seqs], device=dev)  # [B]
        rows = torch.arange(len(seqs), device=dev)
        es_rows = rows[n_rw : n_rw + n_es]
        answer_cols = answer - replay.subject  # [B], suffix coordinates
        # Scope rows: every real position of their suffix; others: δ at column 0 only.
        coef = torch.zeros(replay.cols.shape, device=dev)  # [B, S]
        coef[:, 0] = 1.0
        sc_rows, sc_cols = (replay.cols < replay.lengths[:, None])[n_rw + n_es :].nonzero().T
        sc_rows = sc_rows + n_rw + n_es
        coef[n_rw + n_es :] = 0.0
        coef[sc_rows, sc_cols] = settings.scope_leak
        with torch.no_grad():
            ref_logp = F.log_softmax(head(replay.full_hidden[es_rows, answer[es_rows]]).float(), -1)
            ref_scope = F.log_softmax(
                head(replay.full_hidden[sc_rows, replay.cols[sc_rows, sc_cols]]).float(), -1
            )
        tgt_rows = rows[:n_rw].repeat_interleave(m)  # [n_rw·m]
        tgt_cols = (answer_cols[:n_rw, None] + torch.arange(m, device=dev)).reshape(-1)
        tgt = torch.tensor(rewrites[0].answer, device=dev).repeat(n_rw)  # [n_rw·m]

        v0_norm = float(replay.v0.norm())
        max_norm = settings.clamp_norm_factor * v0_norm
        delta = torch.zeros_like(replay.v0, dtype=torch.float32, requires_grad=True)
        adam = settings.optimizer == "adam"
        optimiser = torch.optim.Adam([delta], lr=settings.lr) if adam else None
        step, nll, reached = 0, float("nan"), False
        with torch.enable_grad():
            for step in range(settings.steps + 1):  # noqa: B007 (read after the loop)
                hidden = replay.hidden(delta, coef)  # [B, S, d]
                logp = F.log_softmax(head(hidden[tgt_rows, tgt_cols]).float(), -1)  # [N, V]
                tok_logp = logp.gather(1, tgt[:, None])[:, 0]  # [n_rw·m]
                loss = -tok_logp.mean()
                nll = float(loss.detach())
                reached = _all_argmax(logp, tok_logp, tgt, settings.stop_margin)
                if reached or step == settings.steps:
                    break
                if settings.kl_factor and essence:
                    now = F.log_softmax(head(hidden[es_rows, answer_cols[es_rows]]).float(), -1)
                    kl = F.kl_div(now, ref_logp, log_target=True, reduction="batchmean")
                    loss = loss + settings.kl_factor * kl
                if use_scope:
                    now = F.log_softmax(head(hidden[sc_rows, sc_cols]).float(), -1)
                    kl = F.kl_div(now, ref_scope, log_target=True, reduction="batchmean")
                    loss = loss + settings.scope_factor * kl
                if settings.weight_decay:
                    loss = loss + settings.weight_decay * delta.pow(2).sum() / v0_norm**2
                if optimiser is not None:
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                else:
                    (grad,) = torch.autograd.grad(loss, [delta])
                    with torch.no_grad():
                        delta.sub_(settings.lr * v0_norm * grad / grad.norm().clamp_min(1e-12))
                with torch.no_grad():
                    norm = delta.norm()
                    if norm > max_norm:
                        delta.mul_(max_norm / norm)
    return ValueResult(
        delta=delta.detach(),
        keys=replay.keys,
        lengths=replay.lengths,
        v0_norm=v0_norm,
        steps=step,
        nll=nll,
        reached=reached,
    )


def _all_argmax(
    logp: torch.Tensor, tok_logp: torch.Tensor, tgt: torch.Tensor, margin: float
) -> bool:
    """Every target token beats every other token by `margin` (log-prob)."""
    others = logp.detach().scatter(1, tgt[:, None], float("-inf")).amax(1)  # [N]
    return bool((tok_logp.detach() - others >= margin).all())
