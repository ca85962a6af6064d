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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from methods.base import EditContext, EditRequest, ParamDelta
from methods.hparams import load_hparams
from methods.memit import LayerSolve, TargetHyperParams, check_common, edit_layers


@dataclass(frozen=True)
class AlphaEditHyperParams(TargetHyperParams):
    nullspace_threshold: float = 0.5  # relative to the mean eigenvalue of C
    l2: float = 1.0  # λ, the ridge that keeps the solve well posed
    preserve_weight: float = 1.0  # w, the weight of earlier edits' keys (the paper: 1)


def load_alphaedit_hparams(
    model_type: str, num_layers: int, overrides: dict | None = None
) -> AlphaEditHyperParams:
    h = load_hparams(AlphaEditHyperParams, "alphaedit", model_type, num_layers, overrides)
    problems = check_common(h, num_layers)
    if not h.nullspace_threshold > 0:
        problems.append(f"nullspace_threshold must be positive, not {h.nullspace_threshold}")
    if not h.l2 > 0:
        problems.append(f"l2 must be positive, not {h.l2}")
    if not h.preserve_weight >= 0:
        problems.append(f"preserve_weight must not be negative, not {h.preserve_weight}")
    if problems:
        raise ValueError("; ".join(problems))
    return h


def null_space_projector(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P [d, d] onto the eigenvectors of `moment` with eigenvalue < threshold · mean eigenvalue."""
    eigenvalues, vectors = torch.linalg.eigh(moment.double())
    kept = vectors[:, eigenvalues < threshold * eigenvalues.mean()]
    return kept @ kept.T


def alphaedit_solver(
    ctx: EditContext, h: AlphaEditHyperParams
) -> Callable[[dict[int, torch.Tensor]], LayerSolve]:
    """AlphaEdit's per-layer solve, given each layer's statistics."""

    def solve_with(moments: dict[int, torch.Tensor]) -> LayerSolve:
        def solve(layer: int, k: torch.Tensor, name: str) -> torch.Tensor:
            p = null_space_projector(moments[layer], h.nullspace_threshold).to(k)
            gram = k.T @ k
            if ctx.edited_keys is not None:
                earlier = ctx.edited_keys(name).to(k)  # [m, d_in]
                gram = gram + h.preserve_weight * (earlier.T @ earlier)
            a = p @ gram + h.l2 * torch.eye(p.shape[0], dtype=k.dtype, device=k.device)
            return torch.linalg.solve(a, p @ k.T).T  # [n, d_in]

        return solve

    return solve_with


def compute_alphaedit(
    ctx: EditContext, requests: list[EditRequest], h: AlphaEditHyperParams
) -> ParamDelta:
    return edit_layers(ctx, requests, h, "AlphaEdit", alphaedit_solver(ctx, h))
