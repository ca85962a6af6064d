"""Where each supported model family keeps the modules that editing and serving touch.

Methods never hard-code module paths: they ask `resolve(model)` for the layer list, each layer's
MLP down-projection (the matrix ROME/MEMIT edit), the final norm and the LM head, and how the
family stores that matrix (`WeightLayout`). Families are keyed by `config.model_type`; adding one
is one entry in `ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths inside a causal LM; `{}` in `down_proj` is the layer index."""

    layers: str
    down_proj: str
    final_norm: str
    lm_head: str
    # GPT-2 stores Conv1D weights as [in, out]; nn.Linear stores [out, in] (`WeightLayout`).
    weight_is_transposed: bool = False


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    down_proj="model.layers.{}.mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": ArchSpec(
        layers="transformer.h",
        down_proj="transformer.h.{}.mlp.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        weight_is_transposed=True,
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        down_proj="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
    ),
}


class UnsupportedArchitecture(ValueError):
    pass


# A change ΔW of one weight, in the layout the parameter stores: dense, or low-rank factors
# (U, V) with ΔW = U @ V.
WeightChange = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class WeightLayout:
    """The one rule for which dimension of an editable weight is its input.

    Methods think of W as [out, in] (y = x Wᵀ), nn.Linear's layout; GPT-2's Conv1D stores W as
    [in, out] (y = x W). Only these methods look at the difference.
    """

    transposed: bool

    def input_width(self, weight: torch.Tensor) -> int:
        return weight.shape[0] if self.transposed else weight.shape[1]

    def stored_factors(
        self, left: torch.Tensor, right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with U @ V = left [d_out, r] @ right [r, d_in] in the parameter's own layout
        (for Conv1D, U @ V is the transpose)."""
        if self.transposed:
            return right.T.contiguous(), left.T.contiguous()
        return left.contiguous(), right.contiguous()

    def output_change(self, x: torch.Tensor, change: WeightChange) -> torch.Tensor:
        """What W + ΔW adds to the module's output for inputs x [..., in]: x ΔWᵀ, or x ΔW for
        Conv1D; low-rank factors are applied one after the other, never multiplied out."""
        if isinstance(change, tuple):
            u, v = change[0].to(x), change[1].to(x)
            return (x @ u) @ v if self.transposed else (x @ v.T) @ u.T
        d = change.to(x)
        return x @ d if self.transposed else x @ d.T


@dataclass(frozen=True)
class ResolvedArch:
    """An `ArchSpec` bound to one model instance."""

    spec: ArchSpec
    model: nn.Module

    @property
    def layout(self) -> WeightLayout:
        return WeightLayout(transposed=self.spec.weight_is_transposed)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.layers)

    def down_proj(self, layer: int) -> nn.Module:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is outside 0..{self.num_layers - 1}")
        return self.model.get_submodule(self.spec.down_proj.format(layer))

    def down_proj_name(self, layer: int) -> str:
        """The state-dict name of the down-projection weight of `layer`."""
        return self.spec.down_proj.format(layer) + ".weight"

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.spec.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_submodule(self.spec.lm_head)


def resolve(model: nn.Module) -> ResolvedArch:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"model type {model_type!r} is not supported; supported types: {supported}"
        )
    return ResolvedArch(spec=spec, model=model)
