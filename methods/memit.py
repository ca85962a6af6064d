"""MEMIT (Meng et al. 2023): a batch of facts spread over several MLP layers.

1. Targets. For each request, δ_i is optimised at the output of the *last* edited layer L (at the
   subject's last token, in the chat contexts; `methods.value_optimiser`): z_i = h_L(i) + δ_i is
   the residual stream that makes the model answer the new target.
2. Spreading. For each edited layer l, lowest first, with the updates of the layers below in
   place: K_l [n, d_in] the requests' keys at l (averaged over contexts), R = (z − h_L) / (layers
   left) the part of the remaining residual this layer takes, and ΔW_l = Rᵀ (λC_l + KᵀK)⁻¹K
   (least squares that keeps W_l k ≈ W_l k for the keys of ordinary text, weighted by their
   second moment C_l = E[kkᵀ], `methods.stats`).

Each ΔW_l has rank ≤ n and is returned as low-rank factors; the keys are returned too, so that
AlphaEdit can protect them later. AlphaEdit (`methods.alphaedit`) reuses steps 1 and 2 with
another per-layer solve.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import EditContext, EditRequest, ParamDelta
from methods.common import (
    CONTEXT_PREFIXES,
    ESSENCE_QUESTIONS,
    MAX_STEPS,
    ChatSequence,
    StopForward,
    added_low_rank,
    edit_sequences,
    first_input,
    first_output,
    forward_until_stopped,
    padded,
)
from methods.hparams import HparamCheck, load_hparams
from methods.spec import ALL_KINDS, SCOPES, MethodSpec
from methods.suffix_replay import SuffixReplay
from methods.value_optimiser import ValueGroup, ValueSettings, optimise_values
from methods.workbench import hooks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetHyperParams:
    """What MEMIT and AlphaEdit share: the edited layers and the target optimisation."""

    layers: tuple[int, ...] | None = None  # null: five layers around num_layers // 6
    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.0
    clamp_norm_factor: float = 4.0
    n_contexts: int = 2  # the bare prompt + n-1 prefixed ones
    n_essence: int = 1  # essence questions per request (common.ESSENCE_QUESTIONS)
    stop_margin: float = 0.0


@dataclass(frozen=True)
class MemitHyperParams(TargetHyperParams):
    mom2_update_weight: float = 15000.0  # λ: how much ordinary keys weigh against the edits


def check_common(h: TargetHyperParams, num_layers: int) -> HparamCheck:
    """The checks of the hyperparameters MEMIT and AlphaEdit share (the caller adds its own)."""
    layers = h.layers or ()
    check = HparamCheck(h)
    check.require(
        all(0 <= layer < num_layers for layer in layers),
        f"layers must be in 0..{num_layers - 1}, not {list(layers)}",
    )
    check.require(len(set(layers)) == len(layers), f"layers must not repeat, not {list(layers)}")
    check.in_range("steps", 1, MAX_STEPS)
    check.in_range("n_contexts", 1, len(CONTEXT_PREFIXES))
    check.in_range("n_essence", 0, len(ESSENCE_QUESTIONS))
    check.positive("lr", "clamp_norm_factor")
    check.not_negative("kl_factor", "weight_decay", "stop_margin")
    return check


def load_memit_hparams(
    model_type: str, num_layers: int, overrides: dict | None = None
) -> MemitHyperParams:
    h = load_hparams(MemitHyperParams, "memit", model_type, num_layers, overrides)
    check_common(h, num_layers).not_negative("mom2_update_weight").done()
    return h


# -- step 1: targets ----------------------------------------------------------------------------


@dataclass
class Targets:
    seqs: list[ChatSequence]  # every request's rewrite rows, then essence rows
    groups: list[ValueGroup]  # one per request
    z: torch.Tensor  # [n, d] the residual after the last layer that gives the new answers
    steps: list[int]  # optimisation steps each request took
    reached: list[bool]  # whether each request met the stop rule within its steps


def compute_targets(ctx: EditContext, requests: list[EditRequest], h: MemitHyperParams) -> Targets:
    last = max(h.layers or ())
    seqs: list[ChatSequence] = []
    groups: list[ValueGroup] = []
    for request in requests:  # ValueError on a subject missing from its prompt
        rewrites, essence = edit_sequences(ctx, request, h.n_contexts, h.n_essence)
        first = len(seqs)
        seqs += [*rewrites, *essence]
        groups.append(
            ValueGroup(
                rewrite_rows=tuple(range(first, first + len(rewrites))),
                essence_rows=tuple(range(first + len(rewrites), len(seqs))),
                answers=(rewrites[0].answer,),
            )
        )
    replay = SuffixReplay(ctx, last, ctx.arch.down_proj(last), seqs, from_block=True)
    values = optimise_values(ctx, replay, groups, ValueSettings.of(h))
    steps, reached = [v.steps for v in values], [v.reached for v in values]
    log.info("targets: %d of %d reached; steps up to %d", sum(reached), len(values), max(steps))
    # δ was added to down_proj(L)'s output, i.e. to the residual stream after block L.
    _, h_last = probe(ctx, [seqs[g.rewrite_rows[0]] for g in groups], (), last)
    z = h_last + torch.stack([v.delta for v in values]).to(h_last)
    return Targets(seqs=seqs, groups=groups, z=z, steps=steps, reached=reached)


# -- step 2: spreading over the layers ----------------------------------------------------------


def probe(
    ctx: EditContext, seqs: list[ChatSequence], layers: tuple[int, ...], last: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """At each sequence's subject: the keys of down_proj(l) for l in `layers` ({l: [B, d_in]})
    and the residual stream after block `last` ([B, d]); the forward stops there, and each
    sequence is run only up to its subject (attention is causal: nothing after it counts)."""
    cut = [s.ids[: s.subject_pos + 1] for s in seqs]
    ids, _ = padded(cut, pad=ctx.tokenizer.pad_token_id or 0)
    rows = torch.arange(len(seqs), device=ctx.device)
    at = torch.tensor([s.subject_pos for s in seqs], device=ctx.device)
    keys: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def key_hook(layer: int) -> Callable:
        def grab(_: nn.Module, inputs: tuple) -> None:
            keys[layer] = first_input(inputs)[rows, at].float()

        return grab

    def grab_residual(_: nn.Module, __: tuple, output: torch.Tensor | tuple) -> None:
        out.append(first_output(output)[rows, at].float())
        raise StopForward

    handles = [ctx.arch.down_proj(i).register_forward_pre_hook(key_hook(i)) for i in layers]
    handles.append(ctx.arch.layers[last].register_forward_hook(grab_residual))
    with hooks(handles):
        forward_until_stopped(ctx, ids.to(ctx.device))
    return keys, out[0]


# (layer, K [n, d_in], parameter name) -> right factor [n, d_in] of ΔW = Rᵀ · right
LayerSolve = Callable[[int, torch.Tensor, str], torch.Tensor]


def spread(
    ctx: EditContext, targets: Targets, layers: tuple[int, ...], solve: LayerSolve
) -> ParamDelta:
    """ΔW for each layer (lowest first), each computed with the ones below it in place."""
    layers = tuple(sorted(layers))
    last = layers[-1]
    groups = targets.groups
    rewrite_seqs = [targets.seqs[r] for g in groups for r in g.rewrite_rows]
    owner = torch.tensor(
        [i for i, g in enumerate(groups) for _ in g.rewrite_rows], device=ctx.device
    )
    # A request's bare prompt is its first rewrite row, so one probe gives keys and residual.
    firsts = [0, *itertools.accumulate(len(g.rewrite_rows) for g in groups[:-1])]
    bare = torch.tensor(firsts, device=ctx.device)
    delta = ParamDelta()
    for i, layer in enumerate(layers):
        name = ctx.arch.down_proj_name(layer)
        with added_low_rank(ctx, delta.low_rank):
            keys, h_rows = probe(ctx, rewrite_seqs, (layer,), last)
        h_last = h_rows[bare]
        k = _mean_by(keys[layer], owner, len(groups))  # [n, d_in], averaged over contexts
        resid = (targets.z - h_last) / (len(layers) - i)  # [n, d]
        right = solve(layer, k.double(), name).float()  # [n, d_in]
        delta.low_rank[name] = ctx.arch.layout.stored_factors(resid.T.cpu(), right.cpu())
        delta.keys[name] = k.cpu()
        log.debug("layer %d: |resid| %.3f", layer, float(resid.norm(dim=1).mean()))
    return delta


def _mean_by(x: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    total = torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, owner, x)
    count = torch.bincount(owner, minlength=n).to(x.dtype)
    return total / count[:, None]


# -- MEMIT ----------------------------------------------------------------------------------------


def edit_layers(
    ctx: EditContext,
    requests: list[EditRequest],
    h: TargetHyperParams,
    method: str,
    solve_with: Callable[[dict[int, torch.Tensor]], LayerSolve],
) -> ParamDelta:
    """Targets, statistics, then the per-layer solve that `solve_with(moments)` gives: the steps
    MEMIT and AlphaEdit share."""
    if not requests:
        raise ValueError(f"{method} needs at least one request")
    if ctx.second_moments is None:
        raise ValueError(f"{method} needs second-moment statistics, and none are available")
    layers = tuple(h.layers or ())
    targets = compute_targets(ctx, requests, h)
    return spread(ctx, targets, layers, solve_with(ctx.second_moments(layers)))


def memit_solver(h: MemitHyperParams) -> Callable[[dict[int, torch.Tensor]], LayerSolve]:
    """MEMIT's per-layer solve, given each layer's statistics."""

    def solve_with(moments: dict[int, torch.Tensor]) -> LayerSolve:
        def solve(layer: int, k: torch.Tensor, _: str) -> torch.Tensor:
            a = h.mom2_update_weight * moments[layer].to(k) + k.T @ k  # [d_in, d_in]
            return torch.linalg.solve(a, k.T).T  # [n, d_in]

        return solve

    return solve_with


def compute_memit(ctx: EditContext, requests: list[EditRequest], h: MemitHyperParams) -> ParamDelta:
    return edit_layers(ctx, requests, h, "MEMIT", memit_solver(h))


SPEC = MethodSpec(
    name="memit",
    kinds=ALL_KINDS,
    scopes=frozenset(SCOPES),
    max_requests=1000,
    load_hparams=load_memit_hparams,
    compute=compute_memit,
    description="a batch of facts spread over several MLP layers by least squares",
    reads_second_moments=True,
)
