"""AlphaEdit (Fang et al. 2025): MEMIT's targets, with each layer's update projected onto the null
space of the keys it must preserve.

For edited layer l: P_l projects onto the eigenvectors of C_l = E[kkᵀ] (ordinary text,
`methods.stats`) whose eigenvalues are below `nullspace_threshold` × their mean, the directions
ordinary keys hardly use. With K [n, d_in] this edit's keys, K_p [m, d_in] the keys of the active
edits at l (`EditContext.edited_keys`: rebuilt from the journaled edits, so undo and restart keep
it exact) and R the layer's share of the residual:

    ΔW_l = Rᵀ · ((P (KᵀK + w K_pᵀK_p) + λ I)⁻¹ P Kᵀ)ᵀ

Every row of ΔW_l lies in P's range, so ΔW_l k ≈ 0 for a key of ordinary text (preserved), and
the K_p term keeps earlier edits' keys where they were written (sequential editing). The paper
weighs it like the new keys (w = 1); w > 1 (`preserve_weight`) trades a new edit's fit where its
keys overlap earlier ones for less drift of the earlier edits.

`protect_prompts` (ours, not the paper's) widens K_p from each earlier edit's subject key to the
keys of its whole chat contexts, answer included, as the model computes them now (from the
requests of the edits in the model, `EditContext.edited_requests`; the template's shared prefix
is left out). Earlier facts fade mostly away from their subject keys: an update moves every
position's output by ~10 %, and an earlier fact is read through the words around its subject
(docs/batch-edits.md). The cost is one forward to the last edited layer over those contexts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from methods.base import EditContext, EditRequest, ParamDelta
from methods.common import chat_sequence, collect_layer_keys, context_questions, target_ids
from methods.hparams import load_hparams
from methods.memit import LayerSolve, TargetHyperParams, check_common, edit_layers
from methods.spec import ALL_KINDS, SCOPES, MethodSpec


@dataclass(frozen=True)
class AlphaEditHyperParams(TargetHyperParams):
    nullspace_threshold: float = 0.5  # relative to the mean eigenvalue of C
    l2: float = 1.0  # λ, the ridge that keeps the solve well posed
    preserve_weight: float = 1.0  # w, the weight of earlier edits' keys (the paper: 1)
    protect_prompts: bool = False  # keep earlier edits' whole chat contexts, not only subjects


def load_alphaedit_hparams(
    model_type: str, num_layers: int, overrides: dict | None = None
) -> AlphaEditHyperParams:
    h = load_hparams(AlphaEditHyperParams, "alphaedit", model_type, num_layers, overrides)
    check = check_common(h, num_layers)
    check.positive("nullspace_threshold", "l2")
    check.not_negative("preserve_weight")
    check.done()
    return h


def null_space_projector(
    moment: torch.Tensor,
    threshold: float,
    eigh: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """P [d, d] onto the eigenvectors of `moment` with eigenvalue < threshold · mean eigenvalue.
    `eigh`: `moment`'s decomposition if the caller keeps one (on 2 CPU cores one of a 1536-wide
    matrix takes ~0.5 s: 5 layers are half of a one-request edit)."""
    eigenvalues, vectors = eigh if eigh is not None else torch.linalg.eigh(moment.double())
    kept = vectors[:, eigenvalues < threshold * eigenvalues.mean()]
    return kept @ kept.T


def prompt_grams(
    ctx: EditContext,
    requests: list[EditRequest],
    layers: tuple[int, ...],
    n_contexts: int,
    chunk: int = 64,
) -> dict[int, torch.Tensor]:
    """Σ k kᵀ [d_in, d_in] (float64) of `down_proj(l)`'s inputs for each l in `layers`, over every
    position of the requests' chat contexts (answers teacher-forced) after the prefix that every
    chat prompt shares (the template's system turn: the same keys for every request)."""
    shared = len(os.path.commonprefix([ctx.chat_prompt("a"), ctx.chat_prompt("b")]))
    seqs = [
        chat_sequence(ctx, q, r.subject, target_ids(ctx.tokenizer, r.target_new)).ids
        for r in requests
        for q in context_questions(r.prompt, n_contexts)
    ]
    grams: dict[int, torch.Tensor] = {}
    for start in range(0, len(seqs), chunk):
        part = seqs[start : start + chunk]
        keys = collect_layer_keys(ctx, layers, part)  # {l: [B, T, d_in]}
        width = next(iter(keys.values())).shape[1]
        pos = torch.arange(width)
        lengths = torch.tensor([len(s) for s in part])
        mask = ((pos >= shared) & (pos < lengths[:, None])).to(ctx.device)  # [B, T]
        for layer in layers:
            k = keys[layer][mask].float()  # [positions, d_in]
            grams[layer] = grams.get(layer, 0) + (k.T @ k).double()
    return grams


def alphaedit_solver(
    ctx: EditContext, h: AlphaEditHyperParams, protected: dict[int, torch.Tensor] | None = None
) -> Callable[[dict[int, torch.Tensor]], LayerSolve]:
    """AlphaEdit's per-layer solve, given each layer's statistics; `protected` adds Σ k kᵀ per
    layer of further keys to keep (`prompt_grams`)."""

    def solve_with(moments: dict[int, torch.Tensor]) -> LayerSolve:
        def solve(layer: int, k: torch.Tensor, name: str) -> torch.Tensor:
            eigh = ctx.moment_eigh(layer) if ctx.moment_eigh is not None else None
            p = null_space_projector(moments[layer], h.nullspace_threshold, eigh).to(k)
            gram = k.T @ k
            if ctx.edited_keys is not None:
                earlier = ctx.edited_keys(name).to(k)  # [m, d_in]
                gram = gram + h.preserve_weight * (earlier.T @ earlier)
            if protected:
                gram = gram + h.preserve_weight * protected[layer].to(k)
            a = p @ gram + h.l2 * torch.eye(p.shape[0], dtype=k.dtype, device=k.device)
            return torch.linalg.solve(a, p @ k.T).T  # [n, d_in]

        return solve

    return solve_with


def protected_grams(ctx: EditContext, h: AlphaEditHyperParams) -> dict[int, torch.Tensor] | None:
    """`prompt_grams` of the edits in the model, if `protect_prompts` asks for them."""
    earlier = ctx.edited_requests() if h.protect_prompts and ctx.edited_requests else []
    return prompt_grams(ctx, earlier, tuple(h.layers or ()), h.n_contexts) if earlier else None


def compute_alphaedit(
    ctx: EditContext, requests: list[EditRequest], h: AlphaEditHyperParams
) -> ParamDelta:
    solver = alphaedit_solver(ctx, h, protected_grams(ctx, h))
    return edit_layers(ctx, requests, h, "AlphaEdit", solver)


SPEC = MethodSpec(
    name="alphaedit",
    kinds=ALL_KINDS,
    scopes=frozenset(SCOPES),
    max_requests=1000,
    load_hparams=load_alphaedit_hparams,
    compute=compute_alphaedit,
    description="MEMIT projected onto the null space of preserved and earlier-edited keys",
    reads_second_moments=True,
)
