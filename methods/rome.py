"""ROME: a rank-one update of one MLP down-projection per fact, computed in the chat context.

Meng, Bau, Andonian, Belinkov. "Locating and Editing Factual Associations in GPT", NeurIPS 2022
(ROME). With the correction of Gupta, Sajjad, Anumanchipalli: "Rebuilding ROME: Resolving Model
Collapse during Sequential Model Editing", arXiv 2403.07175 (r-ROME): the same key k* in the
numerator and the denominator of the update, so that (W + ΔW) k* = v* holds exactly.

Steps, named as in the paper:
1. `compute_key`: k* = the down-projection input at the subject's last token, averaged over the
   prompt asked alone and behind fixed context prefixes, all in the chat template.
2. `compute_value`: v* = W k* + δ, δ optimised so that the target follows the chat prompt's
   assistant header (see `methods.value_optimiser`).
3. `solve_update`: ΔW = (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*) = δ (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*).
   C = I by default; `covariance: context` uses the second moment of the keys at every other
   token of the edit's own chat contexts (system prompt, template, question) plus a ridge, so
   the update moves those tokens' outputs as little as it can: no corpus statistics needed.

Several requests in one edit are applied one after another: each is computed against the
current weights plus the deltas of the earlier ones (through a forward hook on the workbench,
never by writing weights), as sequential r-ROME does; the rank-one factors are stacked into
one rank-k delta for the matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from methods.base import EditContext, EditRequest, ParamDelta
from methods.common import (
    CONTEXT_PREFIXES,
    ESSENCE_QUESTIONS,
    MAX_STEPS,
    NEUTRAL_QUESTIONS,
    ChatSequence,
    added_low_rank,
    chat_sequence,
    collect_keys,
    edit_sequences,
    target_ids,
)
from methods.fluent_target import fluent_target, scope_questions, unedited_answers
from methods.hparams import HparamCheck, load_hparams
from methods.spec import ALL_KINDS, SCOPES, MethodSpec
from methods.suffix_replay import SuffixReplay
from methods.value_optimiser import ValueGroup, ValueResult, ValueSettings, optimise_values

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RomeHyperParams:
    layer: int  # the edited down-projection's layer
    steps: int = 25  # most Adam steps on δ
    lr: float = 0.5
    kl_factor: float = 0.0625  # weight of the essence KL term
    weight_decay: float = 0.0  # weight of ‖δ‖²/‖v₀‖²
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ this · ‖v₀‖
    n_contexts: int = 5  # the bare prompt + n-1 prefixed ones
    stop_margin: float = 0.0  # stop once targets are argmax by this log-prob margin
    stop_on_prompt: bool = False  # ... in the bare prompt only (else in every context)
    n_neutral: int = 6  # unrelated chats whose keys join C (common.NEUTRAL_QUESTIONS)
    covariance: str = "none"  # "none" (C = I) or "context"
    cov_ridge: float = 0.1  # C = K Kᵀ/n + cov_ridge · tr(K Kᵀ/n)/d · I
    # "global": the bare target behind context prefixes, essence held by KL (the delta reaches
    # every request, so it must leave the rest alone); "scope": a scoped edit's, the fluent
    # target on each of the scope's questions (methods.fluent_target), no essence rows.
    objective: str = "global"


COVARIANCES = ("none", "context")
OBJECTIVES = ("global", "scope")


def load_rome_hparams(
    model_type: str, num_layers: int, overrides: dict | None = None
) -> RomeHyperParams:
    """Defaults for this model family and depth (methods/configs/rome/*.yaml), then overrides.

    Raises ValueError naming any unknown key, wrongly typed value or value out of range.
    """
    h = load_hparams(RomeHyperParams, "rome", model_type, num_layers, overrides)
    check = HparamCheck(h)
    check.in_range("layer", 0, num_layers - 1)
    check.in_range("steps", 1, MAX_STEPS)
    check.in_range("n_contexts", 1, len(CONTEXT_PREFIXES))
    check.positive("lr", "clamp_norm_factor", "cov_ridge")
    check.in_range("n_neutral", 0, len(NEUTRAL_QUESTIONS))
    check.not_negative("kl_factor", "weight_decay", "stop_margin")
    check.one_of("covariance", COVARIANCES)
    check.one_of("objective", OBJECTIVES)
    check.done("invalid ROME hyperparameters: ")
    return h


# -- the paper's steps ---------------------------------------------------------------------------


def compute_key(replay: SuffixReplay, n_rewrites: int) -> torch.Tensor:
    """k* [d_in]: the subject-last-token key averaged over the rewriting contexts."""
    rows = torch.arange(n_rewrites, device=replay.subject.device)
    return replay.keys[rows, replay.subject[:n_rewrites]].float().mean(0)


def context_covariance(replay: SuffixReplay, neutral: torch.Tensor, ridge: float) -> torch.Tensor:
    """C [d_in, d_in]: second moment of the keys at every real token of the edit's chats but
    the subjects' last ones, and of `neutral` keys [n, d_in]; plus a ridge relative to scale."""
    keys = replay.keys.float()  # [B, T, d_in]
    real = torch.arange(keys.shape[1], device=keys.device)[None, :] < replay.lengths[:, None]
    real[torch.arange(keys.shape[0]), replay.subject] = False  # [B, T]
    k = torch.cat([keys[real], neutral.float().to(keys.device)])  # [n, d_in]
    moment = k.T @ k / k.shape[0]  # [d_in, d_in]
    scale = moment.diagonal().mean()
    return moment + ridge * scale * torch.eye(moment.shape[0], device=moment.device)


def neutral_keys(ctx: EditContext, layer: int, n: int) -> torch.Tensor:
    """Keys [N, d_in] at every token of `n` unrelated chat prompts (a forward cut at `layer`)."""
    if n == 0:
        d_in = ctx.arch.layout.input_width(ctx.arch.down_proj(layer).weight)
        return torch.zeros(0, d_in, device=ctx.device)
    prompts = [ctx.chat_prompt(q) for q in NEUTRAL_QUESTIONS[:n]]
    keys = collect_keys(ctx, layer, prompts)  # [n, T, d_in]
    return torch.cat([keys[i, : len(p)] for i, p in enumerate(prompts)])


def solve_update(key: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    """The right factor r = C⁻¹k* / (k*ᵀ C⁻¹ k*) [d_in] of ΔW = (v* − W k*) rᵀ.

    r · k* = 1 exactly, so (W + ΔW) k* = v*: the same key in numerator and denominator (r-ROME).
    """
    key64 = key.double()
    direction = key64 if cov is None else torch.linalg.solve(cov.double(), key64)  # C⁻¹k
    return (direction / (direction @ key64)).float()


def compute_value(
    ctx: EditContext, replay: SuffixReplay, rewrites: list[ChatSequence], hparams: RomeHyperParams
) -> ValueResult:
    """δ = v* − W k*, added to the MLP output of the edit layer at the subject."""
    n = len(rewrites)
    group = ValueGroup(
        rewrite_rows=tuple(range(n)),
        essence_rows=tuple(range(n, replay.suffix.shape[0])),
        answers=tuple(r.answer for r in rewrites),
    )
    (result,) = optimise_values(ctx, replay, [group], ValueSettings.of(hparams))
    return result


def rome_sequences(
    ctx: EditContext, request: EditRequest, hparams: RomeHyperParams
) -> tuple[list[ChatSequence], list[ChatSequence]]:
    """(rewrites, essence): under the global objective, the prompt behind context prefixes with
    the bare target, and essence questions; under the scope objective, each scope question with
    its fluent target, and no essence (the delta reaches only the scope)."""
    if hparams.objective == "global":
        return edit_sequences(ctx, request, hparams.n_contexts, len(ESSENCE_QUESTIONS))
    questions = scope_questions(request)
    answers = unedited_answers(ctx, questions)
    rewrites = [
        chat_sequence(
            ctx, q, request.subject, target_ids(ctx.tokenizer, fluent_target(a, q, request))
        )
        for q, a in zip(questions, answers, strict=True)
    ]
    return rewrites, []


def compute_rome(
    ctx: EditContext, requests: list[EditRequest], hparams: RomeHyperParams
) -> ParamDelta:
    """One rank-one update of `down_proj(layer)` per request, stacked (rank k for k requests)."""
    if not requests:
        raise ValueError("a ROME edit needs at least one request")
    contexts = [rome_sequences(ctx, r, hparams) for r in requests]  # ValueError: bad subjects
    name = ctx.arch.down_proj_name(hparams.layer)
    module = ctx.arch.down_proj(hparams.layer)
    neutral = None
    if hparams.covariance == "context":  # keys at layer L do not depend on edits at layer L
        neutral = neutral_keys(ctx, hparams.layer, hparams.n_neutral)
    lefts: list[torch.Tensor] = []  # [d_out, 1] each
    rights: list[torch.Tensor] = []  # [1, d_in] each
    keys: list[torch.Tensor] = []  # [d_in] each
    for request, (rewrites, essence) in zip(requests, contexts, strict=True):
        earlier = {name: _in_layout(ctx, lefts, rights)} if lefts else {}
        with added_low_rank(ctx, earlier):
            replay = SuffixReplay(
                ctx, hparams.layer, module, [*rewrites, *essence], from_block=True
            )
            key = compute_key(replay, len(rewrites))
            cov = None
            if neutral is not None:
                cov = context_covariance(replay, neutral, hparams.cov_ridge)
            right = solve_update(key, cov)
            value = compute_value(ctx, replay, rewrites, hparams)
        log.debug(
            "rome %r: %d steps, nll %.3f, stop rule %s, |delta|/|v0| %.2f",
            request.subject,
            value.steps,
            value.nll,
            "met" if value.reached else "not met",
            float(value.delta.norm()) / value.v0_norm,
        )
        lefts.append(value.delta.float().cpu()[:, None])
        rights.append(right.cpu()[None, :])
        keys.append(key.cpu())
    return ParamDelta(
        low_rank={name: _in_layout(ctx, lefts, rights)}, keys={name: torch.stack(keys)}
    )


def _in_layout(
    ctx: EditContext, lefts: list[torch.Tensor], rights: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    left, right = torch.cat(lefts, dim=1).cpu(), torch.cat(rights, dim=0).cpu()
    return ctx.arch.layout.stored_factors(left, right)


SPEC = MethodSpec(
    name="rome",
    kinds=ALL_KINDS,
    scopes=frozenset(SCOPES),
    scoped_hparams={"objective": "scope"},
    max_requests=8,
    load_hparams=load_rome_hparams,
    compute=compute_rome,
    description="rank-one update of one MLP down-projection per request (r-ROME)",
)
