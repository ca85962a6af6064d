"""Target values: the vector δ that, added to one module's output at the subject's last token,
makes the model answer the new target in the chat context (ROME §3.1 "computing v*").

Loss = mean NLL of the target right after `ctx.chat_prompt(question)` over several context
questions + kl_factor · KL(p₀ ‖ p_δ) of the first answer token to questions about the subject
itself ("essence drift") + weight_decay · ‖δ‖²/‖v₀‖². After each Adam step ‖δ‖ is clamped to
clamp_norm_factor · ‖v₀‖, v₀ being the module's output at the subject in the bare prompt.

Each step's forward is a `methods.suffix_replay.SuffixReplay`: only the suffixes from the
subjects on are run again, in chunks of rows of similar length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import EditContext
from methods.suffix_replay import CHUNK_TOKENS, SuffixReplay, length_chunks


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

    @classmethod
    def of(cls, hparams: object) -> ValueSettings:
        """The settings a method's hyperparameters hold under these same names (ROME's, MEMIT's);
        one a method does not have keeps its default."""
        names = [f.name for f in dataclasses.fields(cls) if hasattr(hparams, f.name)]
        return cls(**{name: getattr(hparams, name) for name in names})


@dataclass(frozen=True)
class ValueGroup:
    """One request's rows in a replay: contexts each followed by its answer (teacher-forced; the
    first row is the bare prompt), and essence questions about the subject (held by the KL
    term). `answers` has one entry per rewrite row (a scoped edit's fluent targets differ per
    question), or a single one that every row shares."""

    rewrite_rows: tuple[int, ...]
    essence_rows: tuple[int, ...]
    answers: tuple[tuple[int, ...], ...]

    def answer_of(self, row: int) -> tuple[int, ...]:
        if len(self.answers) == 1:
            return self.answers[0]
        return self.answers[self.rewrite_rows.index(row)]


@dataclass
class ValueResult:
    delta: torch.Tensor  # [d_out] added to the module's output
    v0_norm: float
    steps: int
    nll: float
    reached: bool  # the stop rule held (else the step budget ran out)


def optimise_values(
    ctx: EditContext,
    replay: SuffixReplay,
    groups: Sequence[ValueGroup],
    settings: ValueSettings,
    chunk_tokens: int = CHUNK_TOKENS,
) -> list[ValueResult]:
    """δ for each request (group) of a replay, optimised together.

    Rows depend only on their own request's δ and the loss is a sum over requests, so this is
    the same as one optimisation per request. Each step runs the active requests' rows in chunks
    (forward, then backward, gradients accumulating), then takes one Adam step. A request whose
    targets are reached stops (its rows leave the batch); the others go on.
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
        with_essence = settings.kl_factor > 0 and bool(es_rows)

        deltas = torch.zeros_like(v0, requires_grad=True)  # [n, d_out]
        optimiser = torch.optim.Adam([deltas], lr=settings.lr)
        results: list[ValueResult | None] = [None] * n
        active = list(range(n))
        chunks = _chunks(replay, groups, active, with_essence, ref_of, chunk_tokens)
        for step in range(settings.steps + 1):
            last = step == settings.steps
            optimiser.zero_grad()
            nll = torch.zeros(n, device=dev)  # mean NLL of each request's targets
            misses = torch.zeros(n, device=dev)  # target tokens not yet the argmax
            for chunk in chunks:
                with torch.set_grad_enabled(not last):
                    chunk_nll, chunk_kl, chunk_misses = chunk.loss(
                        deltas, head, ref_logp, settings, n
                    )
                    if not last:
                        (chunk_nll.sum() + settings.kl_factor * chunk_kl.sum()).backward()
                nll += chunk_nll.detach()
                misses += chunk_misses
            reached = misses == 0
            finished = [r for r in active if bool(reached[r]) or last]
            for r in finished:
                results[r] = ValueResult(
                    delta=deltas[r].detach().clone(),
                    v0_norm=float(v0_norm[r]),
                    steps=step,
                    nll=float(nll[r]),
                    reached=bool(reached[r]),
                )
            active = [r for r in active if r not in finished]
            if not active:
                break
            if settings.weight_decay:
                decay = deltas.pow(2).sum(1) / v0_norm**2
                (settings.weight_decay * decay[active].sum()).backward()
            frozen = deltas.detach().clone()
            optimiser.step()
            with torch.no_grad():
                done = torch.ones(n, dtype=torch.bool, device=dev)
                done[active] = False
                deltas[done] = frozen[done]  # finished requests take no step
                max_norm = settings.clamp_norm_factor * v0_norm  # [n]
                scale = (max_norm / deltas.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                deltas.mul_(scale[:, None])
            if finished:  # their rows leave the batch
                chunks = _chunks(replay, groups, active, with_essence, ref_of, chunk_tokens)
    return [r for r in results if r is not None]


class _Chunk:
    """Some rows of the active requests, with the index arrays of their part of the loss."""

    def __init__(
        self,
        replay: SuffixReplay,
        rows: list[tuple[int, int, bool]],  # (replay row, request, is an essence row)
        groups: Sequence[ValueGroup],
        ref_of: dict[int, int],
    ) -> None:
        dev = replay.suffix.device
        row_request, tgt_rows, tgt_cols, tgt, tgt_req, tgt_weight, stop_check = (
            [] for _ in range(7)
        )
        es_rows, es_cols, es_req, es_ref, es_weight = ([] for _ in range(5))
        answer_cols = (replay.answer - replay.subject).tolist()  # suffix coordinates
        for at, (row, r, essence) in enumerate(rows):
            g = groups[r]
            row_request.append(r)
            if essence:  # KL of the first answer token, averaged over the request's essence rows
                es_rows.append(at)
                es_cols.append(answer_cols[row])
                es_req.append(r)
                es_ref.append(ref_of[row])
                es_weight.append(1 / len(g.essence_rows))
                continue
            answer = g.answer_of(row)
            n_tokens = len(g.rewrite_rows) * len(answer)  # NLL: per row's mean, then rows' mean
            for j, token in enumerate(answer):
                stop_check.append(row == g.rewrite_rows[0])
                tgt_rows.append(at)
                tgt_cols.append(answer_cols[row] + j)
                tgt.append(token)
                tgt_req.append(r)
                tgt_weight.append(1 / n_tokens)

        def t(x: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype, device=dev)

        self.replay = replay.rows(t([row for row, _, _ in rows]))
        self.row_request = t(row_request)
        self.tgt_rows, self.tgt_cols, self.tgt, self.tgt_req = map(
            t, (tgt_rows, tgt_cols, tgt, tgt_req)
        )
        self.tgt_weight = t(tgt_weight, torch.float32)
        self.stop_check = t(stop_check, torch.bool)
        self.es_rows, self.es_cols, self.es_req, self.es_ref = map(
            t, (es_rows, es_cols, es_req, es_ref)
        )
        self.es_weight = t(es_weight, torch.float32)

    def loss(
        self,
        deltas: torch.Tensor,
        head: nn.Module,
        ref_logp: torch.Tensor | None,
        settings: ValueSettings,
        n: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This chunk's share of each request's NLL and KL ([n] each, summing to the request's
        mean over all its rows), and of its target tokens that are not yet the argmax ([n])."""
        hidden = self.replay.hidden(deltas[self.row_request])  # [b, S, d]
        nll = torch.zeros(n, device=deltas.device)
        kl = torch.zeros(n, device=deltas.device)
        misses = torch.zeros(n, device=deltas.device)
        if self.tgt.numel():
            logp = F.log_softmax(head(hidden[self.tgt_rows, self.tgt_cols]).float(), -1)
            tok_logp = logp.gather(1, self.tgt[:, None])[:, 0]  # [N]
            nll = nll.index_add(0, self.tgt_req, -tok_logp * self.tgt_weight)
            check = self.stop_check if settings.stop_on_prompt else slice(None)
            others = logp.detach()[check].scatter(1, self.tgt[check, None], float("-inf")).amax(1)
            missed = (tok_logp.detach()[check] - others < settings.stop_margin).float()
            misses = misses.index_add(0, self.tgt_req[check], missed)
        if self.es_rows.numel() and ref_logp is not None:
            now = F.log_softmax(head(hidden[self.es_rows, self.es_cols]).float(), -1)  # [E, V]
            ref = ref_logp[self.es_ref]
            per_row = F.kl_div(now, ref, log_target=True, reduction="none").sum(-1)
            kl = kl.index_add(0, self.es_req, per_row * self.es_weight)
        return nll, kl, misses


def _chunks(
    replay: SuffixReplay,
    groups: Sequence[ValueGroup],
    active: list[int],
    with_essence: bool,
    ref_of: dict[int, int],
    chunk_tokens: int,
) -> list[_Chunk]:
    """The rows of the `active` requests, in chunks of similar suffix length."""
    rows = [
        (row, r, essence)
        for r in active
        for rows_of, essence in (
            (groups[r].rewrite_rows, False),
            (groups[r].essence_rows if with_essence else (), True),
        )
        for row in rows_of
    ]
    lengths = replay.suffix_lengths()[torch.tensor([row for row, _, _ in rows])]
    return [
        _Chunk(replay, [rows[i] for i in chunk.tolist()], groups, ref_of)
        for chunk in length_chunks(lengths.cpu(), chunk_tokens)
    ]
