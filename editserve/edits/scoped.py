"""A method's `ParamDelta` in the form the engine adds to some rows of a batch only.

A parameter method returns, per weight, U [out, r] and V [r, in] in the parameter's own layout
(ΔW = U @ V; nn.Linear stores [out, in], GPT-2's Conv1D [in, out]). The engine adds a scoped
edit to the rows in its scope as `(x @ down) @ up`, in input/output space, and knows no layout
(`editserve.engine.row_deltas`); this is where the layout is read.
"""

from __future__ import annotations

import torch

from editserve.engine.row_deltas import RowDelta
from methods.base import ParamDelta


def row_delta_from(
    delta: ParamDelta,
    weight_is_transposed: bool,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    label: str = "",
) -> RowDelta:
    """`delta` as a `RowDelta` with factors in `dtype` on `device` (those of the live model).
    `weight_is_transposed`: the weights are stored [in, out] (GPT-2's Conv1D).

    Raises ValueError for a dense ΔW (FT-M): per row it would cost a full [in, out] product
    for each edit, so such an edit can only be global."""
    if delta.dense:
        raise ValueError(
            f"a scoped edit needs a low-rank delta; {', '.join(sorted(delta.dense))} "
            "carries a dense one (FT-M), which cannot be added per request cheaply: "
            "apply it to every request instead"
        )
    if not delta.low_rank:
        raise ValueError("the delta changes no weight: there is nothing to scope")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (u, v) in delta.low_rank.items():
        module, _, param = name.rpartition(".")
        if param != "weight":
            raise ValueError(f"only weight matrices can carry a scoped delta, not {name}")
        # nn.Linear computes x Wᵀ, so x ΔWᵀ = (x Vᵀ) Uᵀ; Conv1D computes x W, so x ΔW = (x U) V.
        down, up = (u, v) if weight_is_transposed else (v.T, u.T)
        factors[module] = (
            down.to(device=device, dtype=dtype).contiguous(),  # [in, r]
            up.to(device=device, dtype=dtype).contiguous(),  # [r, out]
        )
    return RowDelta(factors, label)


__all__ = ["row_delta_from"]
