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

import copy
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
    clamp_norm_factor: float  # ‖δ‖ ≤ this · ‖v₀‖
    # Stop once every target token is the argmax in every context, by this log-prob margin.
    stop_margin: float
    stop_on_prompt: bool = False  # check the stop rule on the bare prompt only


@dataclass(frozen=True)
class ValueGroup:
    """One request's rows in a replay: contexts followed by `answer` (teacher-forced; the first
    is the bare prompt), and essence questions about the subject (held by the KL term)."""

    rewrite_rows: tuple[int, ...]
    essence_rows: tuple[int, ...]
    answer: tuple[int, ...]


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
            rows = torch.arange(batch, device=dev)
            captured["v0"] = _output_tensor(output)[rows, self.subject].detach()

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
        self.keys, self.v0 = captured["keys"], captured["v0"]  # [B, T, d_in], [B, d_out]

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

    def rows(self, keep: torch.Tensor) -> SuffixReplay:
        """A replay of only the rows `keep` [n] (sharing everything recorded)."""
        part = copy.copy(self)
        part.prefix = _PrefixKV()
        part.prefix.recording, part.prefix.width = False, self.prefix.width
        part.prefix.keys = {i: t[keep] for i, t in self.prefix.keys.items()}
        part.prefix.values = {i: t[keep] for i, t in self.prefix.values.items()}
        part.suffix, part.cols, part.mask = self.suffix[keep], self.cols[keep], self.mask[keep]
        return part

    def hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, S, d] of the suffixes with δ added at column 0 (δ: [d_out] for
        every row or [B, d_out] one per row); column j of row b is position subject_b + j."""

        def add_delta(
            _: nn.Module, __: tuple, output: torch.Tensor | tuple
        ) -> torch.Tensor | tuple:
            out = _output_tensor(output)  # [B, S, d_out]
            first = out[:, 0] + delta.to(out.dtype)
            return _replace_output(output, torch.cat([first[:, None], out[:, 1:]], dim=1))

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


def optimise_values(
    ctx: EditContext, replay: SuffixReplay, groups: Sequence[ValueGroup], settings: ValueSettings
) -> list[ValueResult]:
    """δ for each request (group) of a replay, optimised together.

    Rows depend only on their own request's δ and the loss is a sum over requests, so this is
    the same as one optimisation per request, at the price of one batched pass per step. A
    request whose targets are reached stops (its rows leave the batch); the others go on.
    """
    dev, head = ctx.device, ctx.arch.lm_head
    n = len(groups)
    with torch.inference_mode(False), torch.enable_grad():
        # Normal tensors (the replay may have been recorded under inference mode).
        v0 = torch.stack([replay.v0[g.rewrite_rows[0]] for g in groups]).float().clone()
        v0_norm = v0.norm(dim=1)  # [n]
        with torch.no_grad():  # the essence rows' first answer token before any change
            es_rows = [r for g in groups for r in g.essence_rows]
            es_at = replay.full_hidden[es_rows, replay.answer[es_rows]]
            ref_logp = F.log_softmax(head(es_at).float(), -1).clone() if es_rows else None
        ref_of = dict(zip(es_rows, range(len(es_rows)), strict=True))

        deltas = torch.zeros_like(v0, requires_grad=True)  # [n, d_out]
        optimiser = torch.optim.Adam([deltas], lr=settings.lr)
        results: list[ValueResult | None] = [None] * n
        active = list(range(n))
        problem = _Problem(replay, groups, active, settings.kl_factor > 0, ref_of, dev)
        for step in range(settings.steps + 1):
            hidden = problem.replay.hidden(deltas[problem.row_request])  # [B, S, d]
            logp = F.log_softmax(head(hidden[problem.tgt_rows, problem.tgt_cols]).float(), -1)
            tok_logp = logp.gather(1, problem.tgt[:, None])[:, 0]  # [N]
            nll = _per_request_mean(-tok_logp, problem.tgt_req, n)  # [n]
            check = problem.stop_check if settings.stop_on_prompt else slice(None)
            reached = _reached(
                logp[check],
                tok_logp[check],
                problem.tgt[check],
                problem.tgt_req[check],
                n,
                settings.stop_margin,
            )
            finished = [r for r in active if bool(reached[r]) or step == settings.steps]
            for r in finished:
                results[r] = ValueResult(
                    delta=deltas[r].detach().clone(),
                    v0_norm=float(v0_norm[r]),
                    steps=step,
                    nll=float(nll[r].detach()),
                    reached=bool(reached[r]),
                )
            active = [r for r in active if r not in finished]
            if not active:
                break
            loss = nll[active].sum()  # finished requests' rows still ran, but take no step
            if settings.kl_factor and problem.es_rows.numel():
                now = F.log_softmax(
                    head(hidden[problem.es_rows, problem.es_cols]).float(), -1
                )  # [E, V]
                kl = F.kl_div(now, ref_logp[problem.es_ref], log_target=True, reduction="none")
                kl = _per_request_mean(kl.sum(-1), problem.es_req, n)  # [n]
                loss = loss + settings.kl_factor * kl[active].sum()
            if settings.weight_decay:
                decay = deltas.pow(2).sum(1) / v0_norm**2
                loss = loss + settings.weight_decay * decay[active].sum()
            optimiser.zero_grad()
            loss.backward()
            frozen = deltas.detach().clone()
            optimiser.step()
            with torch.no_grad():
                done = torch.ones(n, dtype=torch.bool, device=dev)
                done[active] = False
                deltas[done] = frozen[done]  # Adam's momentum must not move finished requests
                max_norm = settings.clamp_norm_factor * v0_norm  # [n]
                scale = (max_norm / deltas.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                deltas.mul_(scale[:, None])
            if finished:  # their rows leave the batch
                problem = _Problem(replay, groups, active, settings.kl_factor > 0, ref_of, dev)
    return [r for r in results if r is not None]


class _Problem:
    """Index arrays of the loss for the rows of `active` requests (rebuilt when one stops)."""

    def __init__(
        self,
        replay: SuffixReplay,
        groups: Sequence[ValueGroup],
        active: list[int],
        with_essence: bool,
        ref_of: dict[int, int],
        dev: torch.device,
    ) -> None:
        rows, row_request = [], []
        tgt_rows, tgt_cols, tgt, tgt_req, stop_check = [], [], [], [], []
        es_rows, es_cols, es_req, es_ref = [], [], [], []
        answer_cols = (replay.answer - replay.subject).tolist()  # suffix coordinates
        for r in active:
            g = groups[r]
            for i, row in enumerate(g.rewrite_rows):
                at = len(rows)
                rows.append(row)
                row_request.append(r)
                for j, token in enumerate(g.answer):
                    stop_check.append(i == 0)
                    tgt_rows.append(at)
                    tgt_cols.append(answer_cols[row] + j)
                    tgt.append(token)
                    tgt_req.append(r)
            for row in g.essence_rows if with_essence else ():
                es_rows.append(len(rows))
                es_cols.append(answer_cols[row])
                es_req.append(r)
                es_ref.append(ref_of[row])
                rows.append(row)
                row_request.append(r)

        def t(x: list) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=dev)

        self.replay = replay.rows(t(rows))
        self.row_request = t(row_request)
        self.tgt_rows, self.tgt_cols, self.tgt, self.tgt_req = (
            t(tgt_rows),
            t(tgt_cols),
            t(tgt),
            t(tgt_req),
        )
        self.stop_check = torch.tensor(stop_check, dtype=torch.bool, device=dev)
        self.es_rows, self.es_cols, self.es_req, self.es_ref = (
            t(es_rows),
            t(es_cols),
            t(es_req),
            t(es_ref),
        )


def _per_request_mean(x: torch.Tensor, request: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of x [N] per request index [N] -> [n] (0 where a request has none)."""
    total = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, request, x)
    count = torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, request, torch.ones_like(x))
    return total / count.clamp_min(1)


def _reached(
    logp: torch.Tensor,
    tok_logp: torch.Tensor,
    tgt: torch.Tensor,
    request: torch.Tensor,
    n: int,
    margin: float,
) -> torch.Tensor:
    """[n] bool: every target token of the request beats every other token by `margin`."""
    others = logp.detach().scatter(1, tgt[:, None], float("-inf")).amax(1)  # [N]
    missed = (tok_logp.detach() - others < margin).float()
    misses = torch.zeros(n, device=logp.device).index_add(0, request, missed)
    return misses == 0
