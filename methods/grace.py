"""GRACE: a key/value codebook at one MLP down-projection, computed in the chat context.

Hartvigsen, Sankaranarayanan, Palangi, Kim, Ghassemi. "Aging with GRACE: Lifelong Model Editing
with Discrete Key-Value Adaptors", NeurIPS 2023.

Per request:
1. key = the input of `down_proj(layer)` at the chat prompt's last token (the assistant header's
   end: the position that predicts the answer's first token), on the model as served (weights
   with their deltas, the live codebook active).
2. value = the vector that, replacing the down-projection's output wherever a position's input
   lies within the key's radius, makes the model generate the target after the chat prompt.
   Trained by `memory.value_training.train_value` through `Codebook.attached`, i.e. with exactly
   the lookup the server runs, the existing entries included (expand/split may change them). The
   prompt's prefix is recorded once (`methods.suffix_replay.SuffixReplay`); each step re-runs
   only the last prompt token and the teacher-forced target.
3. the codebook op (key, label = the normalised target, value, radius ε₀) is what the edit
   journals; the live codebook folds it with GRACE's new/expand/split rules
   (`memory.grace_rules`). Several requests of one edit are trained in turn on a scratch copy
   of the codebook holding the earlier ones.

The radius decides scope. Keys are taken at the same template token for every question, so they
differ only by what attention brought from the question; see docs/memory-edits.md for the
distances measured on ZsRE dev records and the calibrated ε₀ in methods/configs/grace.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memory.codebook import Codebook
from memory.value_training import train_value
from methods.base import EditContext, EditRequest
from methods.common import MAX_STEPS, ChatSequence, target_ids
from methods.hparams import HparamCheck, load_hparams
from methods.memory_common import MemoryContext, MemoryPayload
from methods.spec import ALL_KINDS, MethodSpec
from methods.suffix_replay import SuffixReplay

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraceHyperParams:
    layer: int  # the down-projection holding the codebook (one per server)
    radius: float = 8.0  # ε₀, Euclidean, in the key space (down_proj inputs)
    steps: int = 40  # most Adam steps on the value
    lr: float = 1.0
    stop_below: float = 0.05  # mean target NLL at which training stops
    stop_margin: float = 1.0  # ... or once every target token is the argmax by this log-prob


def load_grace_hparams(
    model_type: str, num_layers: int, overrides: dict | None = None
) -> GraceHyperParams:
    h = load_hparams(GraceHyperParams, "grace", model_type, num_layers, overrides)
    check = HparamCheck(h)
    check.in_range("layer", 0, num_layers - 1)
    check.positive("radius")
    check.in_range("steps", 1, MAX_STEPS)
    check.positive("lr")
    check.require(h.stop_below >= 0, f"stop_below must be at least 0, not {h.stop_below}")
    check.done()
    return h


def label(target: str) -> str:
    """Equal labels = the same answer: GRACE expands an entry for those, splits for others."""
    return " ".join(target.lower().split())


def compute_grace(
    ctx: EditContext, memory: MemoryContext, requests: list[EditRequest], h: GraceHyperParams
) -> MemoryPayload:
    if memory.codebook_layer is not None and h.layer != memory.codebook_layer:
        raise ValueError(
            f"this server's GRACE codebook sits at layer {memory.codebook_layer}; "
            f"an edit cannot use layer {h.layer}"
        )
    module = ctx.arch.down_proj(h.layer)
    # Later requests of the edit are trained against the earlier ones: a scratch codebook.
    scratch = Codebook.from_tensors(memory.codebook.to_tensors())
    keys, values, radii, entries = [], [], [], []
    with memory.bench_without_codebook():
        for request in requests:
            key, value, report = _one(ctx, scratch, module, request, h)
            scratch.add("<scratch>", key, label(request.target_new), value, h.radius)
            keys.append(key)
            values.append(value)
            radii.append(h.radius)
            entries.append(
                {"prompt": request.prompt, "target": request.target_new, "layer": h.layer, **report}
            )
    return MemoryPayload(
        entries=entries,
        tensors={
            "keys": torch.stack(keys),  # [n, d_ff]
            "values": torch.stack(values),  # [n, d_model]
            "radii": torch.tensor(radii, dtype=torch.float32),  # [n]
        },
    )


def _one(
    ctx: EditContext,
    codebook: Codebook,
    module: torch.nn.Module,
    request: EditRequest,
    h: GraceHyperParams,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    prompt = list(ctx.chat_prompt(request.prompt))
    answer = target_ids(ctx.tokenizer, request.target_new)
    eos = ctx.tokenizer.eos_token_id
    if eos is not None:
        answer = [*answer, eos]  # the answer ends there: no run-on after the target
    last = len(prompt) - 1
    seq = ChatSequence(tuple(prompt + answer[:-1]), last, last, tuple(answer))
    with codebook.attached(module):  # the served model: existing entries active
        replay = SuffixReplay(ctx, h.layer, module, [seq])  # records the prefix once
    key = replay.keys[0, last].float()  # [d_ff]: the down_proj input at the last prompt token
    plan = codebook.plan(key, label(request.target_new), h.radius)
    init = plan.init_value if plan.init_value is not None else replay.v0.float()  # warm start
    tgt = torch.tensor(answer, device=ctx.device)
    cols = torch.arange(len(answer), device=ctx.device)  # suffix column j predicts answer[j]
    zero = torch.zeros_like(replay.v0)
    reached = [False]

    def loss_fn(value: torch.Tensor) -> torch.Tensor:
        with codebook.attached(module, key, label(request.target_new), value, h.radius):
            hidden = replay.hidden(zero)[0, cols]  # [m, d]
        logp = F.log_softmax(ctx.arch.lm_head(hidden).float(), -1)
        tok = logp.gather(1, tgt[:, None])[:, 0]  # [m]
        others = logp.detach().scatter(1, tgt[:, None], float("-inf")).amax(1)
        reached[0] = bool((tok.detach() - others >= h.stop_margin).all())
        return -tok.mean()

    fit = train_value(
        loss_fn, init, steps=h.steps, lr=h.lr, stop_below=h.stop_below, done=lambda: reached[0]
    )
    report = {
        "decision": str(plan.decision),
        "steps": len(fit.losses),
        "nll": round(fit.loss, 4),
        "converged": fit.converged,
    }
    log.info("GRACE %r -> %r: %s", request.prompt, request.target_new, report)
    return key.cpu(), fit.value.cpu(), report


SPEC = MethodSpec(
    name="grace",
    kinds=ALL_KINDS,
    max_requests=8,
    load_hparams=load_grace_hparams,
    compute=compute_grace,
    description="key/value codebook at one down-projection, with a deferral radius",
    payload="memory",
    memory_store="codebook",
)
