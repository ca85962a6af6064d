"""FT-M: fine-tune one MLP down-projection on the target tokens only (EasyEdit's "FT-M").

The loss is the NLL of each request's target right after its chat prompt (in `n_contexts`
wordings), masked to the target tokens: the prompt is never a training target. Only ΔW, a dense
matrix added to down_proj(layer)'s weight through a hook, takes gradients; each element stays
within ±`norm_constraint` (FT-L's box constraint, which keeps the change small). Training stops
once every target token is the greedy choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.base import EditContext, EditRequest, ParamDelta
from methods.common import (
    CONTEXT_PREFIXES,
    MAX_STEPS,
    causal_mask,
    chat_sequence,
    context_questions,
    padded,
    target_ids,
)
from methods.hparams import HparamCheck, load_hparams
from methods.spec import ALL_KINDS, MethodSpec
from methods.workbench import added_weights


@dataclass(frozen=True)
class FtHyperParams:
    layer: int | None = None  # null: num_layers // 6
    steps: int = 25
    lr: float = 1e-3
    norm_constraint: float = 5e-3  # |ΔW_ij| ≤ this
    n_contexts: int = 1


def load_ft_hparams(
    model_type: str, num_layers: int, overrides: dict | None = None
) -> FtHyperParams:
    h = load_hparams(FtHyperParams, "ft", model_type, num_layers, overrides)
    check = HparamCheck(h)
    check.in_range("layer", 0, num_layers - 1)
    check.in_range("steps", 1, MAX_STEPS)
    check.in_range("n_contexts", 1, len(CONTEXT_PREFIXES))
    check.positive("lr", "norm_constraint")
    check.done()
    return h


def compute_ft(ctx: EditContext, requests: list[EditRequest], h: FtHyperParams) -> ParamDelta:
    if not requests:
        raise ValueError("an FT-M edit needs at least one request")
    seqs = []
    for request in requests:  # ValueError on a subject missing from its prompt
        answer = target_ids(ctx.tokenizer, request.target_new)
        seqs += [
            chat_sequence(ctx, q, request.subject, answer)
            for q in context_questions(request.prompt, h.n_contexts)
        ]
    dev = ctx.device
    ids, _ = padded([s.ids for s in seqs], ctx.tokenizer.pad_token_id or 0)
    ids = ids.to(dev)
    # Target positions: logits at answer_pos + j predict answer[j].
    rows = torch.tensor([b for b, s in enumerate(seqs) for _ in s.answer], device=dev)
    cols = torch.tensor([s.answer_pos + j for s in seqs for j in range(len(s.answer))], device=dev)
    tgt = torch.tensor([t for s in seqs for t in s.answer], device=dev)

    name = ctx.arch.down_proj_name(h.layer)
    weight = ctx.arch.down_proj(h.layer).weight
    with torch.inference_mode(False), torch.enable_grad():
        delta = torch.zeros(weight.shape, dtype=torch.float32, device=dev, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=h.lr)
        with added_weights(ctx.model, ctx.arch.layout, {name: delta}):
            for _ in range(h.steps):
                hidden = ctx.model.base_model(
                    input_ids=ids, attention_mask=causal_mask(*ids.shape, dev), use_cache=False
                ).last_hidden_state
                logits = ctx.arch.lm_head(hidden[rows, cols]).float()  # [N, V]
                if bool((logits.argmax(-1) == tgt).all()):
                    break
                loss = F.cross_entropy(logits, tgt)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    delta.clamp_(-h.norm_constraint, h.norm_constraint)
    return ParamDelta(dense={name: delta.detach().cpu()})


SPEC = MethodSpec(
    name="ft",
    kinds=ALL_KINDS,
    max_requests=100,
    load_hparams=load_ft_hparams,
    compute=compute_ft,
    description="FT-M: one down-projection fine-tuned on the target tokens (dense delta)",
)
