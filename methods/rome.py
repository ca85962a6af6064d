"""ROME: a rank-one update of one MLP down-projection per fact, computed in the chat context.

Meng, Bau, Andonian, Belinkov. "Locating and Editing Factual Associations in GPT", NeurIPS 2022
(ROME). With the correction of Gupta, Sajjad, Anumanchipalli: "Rebuilding ROME: Resolving Model
Collapse during Sequential Model Editing", arXiv 2403.07175 (r-ROME): the same key k* in the
numerator and the denominator of the update, so that (W + ΔW) k* = v* holds exactly.

Steps, named as in the paper:
1. `compute_key`: k* = the down-projection input at the subject's last token, averaged over the
   prompt asked alone and behind fixed context prefixes, all in the chat template.
2. `compute_value`: v* = W k* + δ, δ optimised so that the target follows the chat prompt's
   assistant header (see `methods.values`).
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
    ESSENCE_QUESTIONS,
    SCOPE_QUESTIONS,
    ChatSequence,
    added_low_rank,
    chat_sequence,
    context_questions,
    scope_sequences,
    target_ids,
)
from methods.hparams import load_hparams
from methods.values import ValueResult, ValueSettings, optimise_value

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
    scope_factor: float = 0.0  # weight of the KL of unrelated chats with leaked δ
    scope_leak: float = 0.1  # the fraction of δ they get at every token
    n_scope: int = 4  # unrelated chats (common.SCOPE_QUESTIONS)
    optimizer: str = "adam"  # or "normalized": steps of length lr·‖v₀‖ along the gradient
    covariance: str = "none"  # "none" (C = I) or "context"
    cov_ridge: float = 0.1  # C = K Kᵀ/n + cov_ridge · tr(K Kᵀ/n)/d · I


COVARIANCES = ("none", "context")
OPTIMIZERS = ("adam", "normalized")


def _check(h: RomeHyperParams, num_layers: int) -> None:
    problems = []
    if not 0 <= h.layer < num_layers:
        problems.append(f"layer must be in 0..{num_layers - 1}, not {h.layer}")
    if h.steps < 1:
        problems.append(f"steps must be at least 1, not {h.steps}")
    if not 1 <= h.n_contexts <= 10:
        problems.append(f"n_contexts must be in 1..10, not {h.n_contexts}")
    for name in ("lr", "clamp_norm_factor", "cov_ridge"):
        if not getattr(h, name) > 0:
            problems.append(f"{name} must be positive, not {getattr(h, name)}")
    if not 0 <= h.n_scope <= len(SCOPE_QUESTIONS):
        problems.append(f"n_scope must be in 0..{len(SCOPE_QUESTIONS)}, not {h.n_scope}")
    for name in ("kl_factor", "weight_decay", "stop_margin", "scope_factor", "scope_leak"):
        if not getattr(h, name) >= 0:
            problems.append(f"{name} must not be negative, not {getattr(h, name)}")
    if h.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {h.optimizer!r}")
    if h.covariance not in COVARIANCES:
        problems.append(f"covariance must be one of {', '.join(COVARIANCES)}, not {h.covariance!r}")
    if problems:
        raise ValueError("invalid ROME hyperparameters: " + "; ".join(problems))


def load_rome_hparams(
    model_type: str, num_layers: int, overrides: dict | None = None
) -> RomeHyperParams:
    """Defaults for this model family and depth (configs/methods/rome/*.yaml), then overrides.

    Raises ValueError naming any unknown key, wrongly typed value or value out of range.
    """
    hparams = load_hparams(RomeHyperParams, "rome", model_type, num_layers, overrides)
    _check(hparams, num_layers)
    return hparams


# -- the paper's steps ---------------------------------------------------------------------------


def build_contexts(
    ctx: EditContext, request: EditRequest, hparams: RomeHyperParams
) -> tuple[list[ChatSequence], list[ChatSequence]]:
    """Rewriting sequences (the prompt in n contexts, then the target) and essence sequences."""
    answer = target_ids(ctx.tokenizer, request.target_new)
    rewrites = [
        chat_sequence(ctx, question, request.subject, answer)
        for question in context_questions(request.prompt, hparams.n_contexts)
    ]
    essence = [
        chat_sequence(ctx, q.format(request.subject), request.subject) for q in ESSENCE_QUESTIONS
    ]
    return rewrites, essence


def compute_value(
    ctx: EditContext,
    rewrites: list[ChatSequence],
    essence: list[ChatSequence],
    hparams: RomeHyperParams,
) -> ValueResult:
    """δ = v* − W k*, added to the MLP output of the edit layer (plus every key of the batch)."""
    settings = ValueSettings(
        steps=hparams.steps,
        lr=hparams.lr,
        kl_factor=hparams.kl_factor,
        weight_decay=hparams.weight_decay,
        clamp_norm_factor=hparams.clamp_norm_factor,
        stop_margin=hparams.stop_margin,
        optimizer=hparams.optimizer,
        scope_factor=hparams.scope_factor,
        scope_leak=hparams.scope_leak,
    )
    module = ctx.arch.down_proj(hparams.layer)
    scope = scope_sequences(ctx, SCOPE_QUESTIONS[: hparams.n_scope])
    return optimise_value(ctx, hparams.layer, module, rewrites, essence, settings, scope)


def compute_key(value: ValueResult, n_rewrites: int, subject_pos: torch.Tensor) -> torch.Tensor:
    """k* [d_in]: the subject-last-token key averaged over the rewriting contexts."""
    rows = torch.arange(n_rewrites)
    return value.keys[rows, subject_pos[:n_rewrites]].float().mean(0)


def context_covariance(value: ValueResult, subject_pos: torch.Tensor, ridge: float) -> torch.Tensor:
    """C [d_in, d_in]: second moment of the keys at every real token but the subjects' last,
    plus a ridge relative to their mean squared norm."""
    keys = value.keys.float()  # [B, T, d_in]
    real = torch.arange(keys.shape[1])[None, :] < value.lengths[:, None].cpu()  # [B, T]
    real[torch.arange(len(subject_pos)), subject_pos] = False  # rewrite and essence rows
    k = keys[real.to(keys.device)]  # [n, d_in]
    moment = k.T @ k / k.shape[0]  # [d_in, d_in]
    scale = moment.diagonal().mean()
    return moment + ridge * scale * torch.eye(moment.shape[0], device=moment.device)


def solve_update(
    key: torch.Tensor, residual: torch.Tensor, cov: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = residual (C⁻¹k)ᵀ / (kᵀC⁻¹k) as factors ([d_out, 1], [1, d_in]), nn.Linear layout."""
    key64 = key.double()
    direction = key64 if cov is None else torch.linalg.solve(cov.double(), key64)  # C⁻¹k [d_in]
    right = direction / (direction @ key64)  # [d_in]; right · k = 1 exactly: r-ROME
    return residual.float()[:, None], right.float()[None, :]


def compute_rome(
    ctx: EditContext, requests: list[EditRequest], hparams: RomeHyperParams
) -> ParamDelta:
    """One rank-one update of `down_proj(layer)` per request, stacked (rank k for k requests)."""
    if not requests:
        raise ValueError("a ROME edit needs at least one request")
    name = ctx.arch.down_proj_name(hparams.layer)
    lefts: list[torch.Tensor] = []  # [d_out, 1] each
    rights: list[torch.Tensor] = []  # [1, d_in] each
    for request in requests:
        rewrites, essence = build_contexts(ctx, request, hparams)  # ValueError on a bad subject
        earlier = {name: _in_layout(ctx, lefts, rights)} if lefts else {}
        with added_low_rank(ctx, earlier):
            value = compute_value(ctx, rewrites, essence, hparams)
        subject_pos = torch.tensor([s.subject_pos for s in (*rewrites, *essence)])
        key = compute_key(value, len(rewrites), subject_pos)
        cov = None
        if hparams.covariance == "context":
            cov = context_covariance(value, subject_pos, hparams.cov_ridge)
        left, right = solve_update(key, value.delta, cov)
        log.debug(
            "rome %r: %d steps, nll %.3f, stop rule %s, |delta|/|v0| %.2f",
            request.subject,
            value.steps,
            value.nll,
            "met" if value.reached else "not met",
            float(value.delta.norm()) / value.v0_norm,
        )
        lefts.append(left)
        rights.append(right)
    return ParamDelta(low_rank={name: _in_layout(ctx, lefts, rights)})


def _in_layout(
    ctx: EditContext, lefts: list[torch.Tensor], rights: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U @ V = Σ left_i right_i in the parameter's layout (Conv1D: transposed)."""
    u = torch.cat(lefts, dim=1).cpu()  # [d_out, k]
    v = torch.cat(rights, dim=0).cpu()  # [k, d_in]
    if ctx.arch.spec.weight_is_transposed:  # GPT-2 Conv1D stores [in, out]
        return v.T.contiguous(), u.T.contiguous()
    return u.contiguous(), v.contiguous()
