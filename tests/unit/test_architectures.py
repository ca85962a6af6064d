"""The architecture registry resolves the modules editing methods need, per family."""

from __future__ import annotations

import pytest
from torch import nn

from methods.architectures import UnsupportedArchitecture, resolve
from tests.conftest import tiny_model


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_resolves_layers_down_proj_norm_and_head(kind: str) -> None:
    model = tiny_model(kind).model
    arch = resolve(model)
    assert arch.num_layers == 2
    weight = arch.down_proj(1).weight
    hidden, ffn = 32, (64 if kind != "gpt2" else 128)  # GPT-2's MLP is 4 x hidden
    expected = (ffn, hidden) if arch.spec.weight_is_transposed else (hidden, ffn)
    assert tuple(weight.shape) == expected
    assert arch.down_proj_name(1) in dict(model.named_parameters()) or kind == "gpt2"
    assert isinstance(arch.final_norm, nn.Module)
    assert arch.lm_head is model.get_output_embeddings()
    with pytest.raises(IndexError):
        arch.down_proj(2)


def test_unsupported_type_names_the_supported_ones() -> None:
    model = tiny_model("llama").model
    model.config.model_type = "t5"
    with pytest.raises(UnsupportedArchitecture, match="llama"):
        resolve(model)
