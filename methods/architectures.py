"""Where each supported model family keeps the modules that editing and serving touch.

Methods never hard-code module paths: they ask `resolve(model)` for the layer list, each layer's
MLP down-projection (the matrix ROME/MEMIT edit), the final norm and the LM head. Families are
keyed by `config.model_type`; adding one is one entry in `ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths inside a causal LM; `{}` in `down_proj` is the layer index."""

    layers: str
    down_proj: str
    final_norm: str
    lm_head: str
    # GPT-2 stores Conv1D weights as [in, out]; nn.Linear stores [out, in].
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


@dataclass(frozen=True)
class ResolvedArch:
    """An `ArchSpec` bound to one model instance."""

    spec: ArchSpec
    model: nn.Module

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
