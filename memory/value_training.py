"""Fitting a value vector by gradient descent (GRACE's value training; ROME's v* in spirit).

Model-free: the caller's `loss_fn(v)` runs the model with v in place (for GRACE, inside
`Codebook.attached(module, key, label, v)`) and returns a scalar, such as the target's NLL right
after the chat prompt. Model weights should have requires_grad False, so v is the only leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ValueFit:
    value: torch.Tensor  # [d_out], the best value seen
    loss: float  # its loss
    losses: list[float]  # one per evaluation
    converged: bool  # reached stop_below (else the step budget ran out)


def train_value(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    init: torch.Tensor,
    steps: int = 50,
    lr: float = 0.1,
    optimizer: str = "adam",
    stop_below: float | None = None,
    max_norm: float | None = None,
    done: Callable[[], bool] | None = None,
) -> ValueFit:
    """Optimises a value vector: `loss_fn(v)` must run the model with v in place (e.g. inside
    `Codebook.attached(module, key, label, v)`) and return a scalar loss, such as the target's
    NLL after the chat prompt. `max_norm` projects v back onto that ball after each step. `done()`,
    asked after each evaluation, ends training early too (e.g. the target is already the argmax:
    a rule `loss_fn` can record as it computes)."""
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', not {optimizer!r}")
    v = init.detach().float().reshape(-1).clone().requires_grad_(True)  # [d_out]
    opt = torch.optim.Adam([v], lr=lr) if optimizer == "adam" else torch.optim.SGD([v], lr=lr)
    best, best_loss, losses = v.detach().clone(), float("inf"), []
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(v)
            losses.append(loss.detach().item())
            if losses[-1] < best_loss:
                best, best_loss = v.detach().clone(), losses[-1]
            if (stop_below is not None and losses[-1] < stop_below) or (done and done()):
                return ValueFit(v.detach().clone(), losses[-1], losses, True)
            loss.backward()
            opt.step()
            if max_norm is not None:
                with torch.no_grad():
                    v.mul_((max_norm / v.norm().clamp(min=1e-12)).clamp(max=1.0))
    return ValueFit(best, best_loss, losses, False)
