"""ROME on tiny random models: shape and rank of the delta, weights untouched, the edit holds."""

from __future__ import annotations

import copy

import pytest
import torch

from methods.architectures import resolve
from methods.base import EditContext, EditRequest, ParamDelta
from methods.common import target_ids
from methods.rome import RomeHyperParams, compute_rome, load_rome_hparams
from tests.conftest import tiny_model
from tests.unit.test_method_common import make_ctx

REQUEST = EditRequest(
    prompt="Where is the Eiffel Tower?", subject="Eiffel Tower", target_new="Rome"
)


def hparams(**overrides: object) -> RomeHyperParams:
    base = {"layer": 0, "steps": 40, "lr": 0.5, "n_contexts": 3, "stop_margin": 0.5}
    return load_rome_hparams("llama", 2, {**base, **overrides})


def completion_ctx(kind: str) -> EditContext:
    """A tiny model whose head is scaled ×20, prompting with the raw question (no template)."""
    loaded = tiny_model(kind)
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(20.0)
    tok = loaded.tokenizer
    return EditContext(
        model=loaded.model,
        tokenizer=tok,
        arch=resolve(loaded.model),
        chat_prompt=lambda q: tok(q, add_special_tokens=False)["input_ids"],
    )


def edited_copy(ctx: EditContext, delta: ParamDelta) -> torch.nn.Module:
    model = copy.deepcopy(ctx.model)
    with torch.no_grad():
        for name in delta.names():
            model.get_parameter(name).add_(delta.matrix(name))
    return model


def target_logprobs(ctx: EditContext, model: torch.nn.Module, request: EditRequest):
    """Per-token log-probs and greedy hits of the target right after the chat prompt."""
    prompt = ctx.chat_prompt(request.prompt)
    answer = target_ids(ctx.tokenizer, request.target_new)
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)  # [m, V]
    tgt = torch.tensor(answer)
    return logp.gather(1, tgt[:, None])[:, 0], bool((logp.argmax(-1) == tgt).all())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_delta_is_rank_one_in_the_weights_layout_and_weights_stay_bit_identical(kind: str) -> None:
    ctx = make_ctx(kind)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    delta = compute_rome(ctx, [REQUEST], hparams(steps=5))
    name = ctx.arch.down_proj_name(0)
    assert delta.names() == [name]
    u, v = delta.low_rank[name]
    weight = ctx.model.get_parameter(name)
    assert u.shape == (weight.shape[0], 1) and v.shape == (1, weight.shape[1])
    assert u.dtype == v.dtype == torch.float32
    assert torch.linalg.matrix_rank(delta.matrix(name)) == 1
    after = ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in ctx.model.parameters())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("covariance", ["none", "context"])
def test_after_the_edit_the_target_is_the_greedy_continuation(kind: str, covariance: str) -> None:
    """A random 2-layer model attends almost uniformly, so nothing at the subject can steer a
    token a chat template later; and its logits span a fraction of a nat. So here the subject
    ends the prompt (it predicts the answer itself), the head is scaled ×20 to let the model be
    confident, and δ may grow far past ‖v₀‖ (tiny in a random model). The chat-context path is
    covered by the replay test in test_method_common and by the evaluation on a real model."""
    ctx = completion_ctx(kind)
    request = EditRequest(
        prompt="The city of the Eiffel Tower", subject="Eiffel Tower", target_new="R"
    )
    old, hit_before = target_logprobs(ctx, ctx.model, request)
    delta = compute_rome(ctx, [request], hparams(clamp_norm_factor=100.0, covariance=covariance))
    new, hit_after = target_logprobs(ctx, edited_copy(ctx, delta), request)
    assert not hit_before and hit_after
    assert new.sum() > old.sum() + 4.0 and new.sum() > -1.5


def test_the_edit_is_reproducible_and_works_in_inference_mode() -> None:
    ctx = make_ctx()
    first = compute_rome(ctx, [REQUEST], hparams(steps=5))
    with torch.inference_mode():
        second = compute_rome(ctx, [REQUEST], hparams(steps=5))
    name = ctx.arch.down_proj_name(0)
    assert torch.equal(first.matrix(name), second.matrix(name))


def test_several_requests_stack_into_one_rank_k_delta() -> None:
    ctx = completion_ctx("llama")
    first = EditRequest(
        prompt="The city of the Eiffel Tower", subject="Eiffel Tower", target_new="R"
    )
    second = EditRequest(prompt="The field of Marie Curie", subject="Marie Curie", target_new="a")
    delta = compute_rome(ctx, [first, second], hparams(clamp_norm_factor=100.0))
    name = ctx.arch.down_proj_name(0)
    u, v = delta.low_rank[name]
    assert u.shape[1] == v.shape[0] == 2
    model = edited_copy(ctx, delta)
    assert target_logprobs(ctx, model, first)[1] and target_logprobs(ctx, model, second)[1]


def test_a_later_request_is_computed_on_top_of_the_earlier_ones() -> None:
    # The same fact edited twice in one edit: the second value wins, as if edited in sequence.
    ctx = completion_ctx("llama")
    first = EditRequest(
        prompt="The city of the Eiffel Tower", subject="Eiffel Tower", target_new="R"
    )
    second = EditRequest(
        prompt="The city of the Eiffel Tower", subject="Eiffel Tower", target_new="Q"
    )
    delta = compute_rome(ctx, [first, second], hparams(clamp_norm_factor=100.0))
    assert target_logprobs(ctx, edited_copy(ctx, delta), second)[1]


def test_a_subject_missing_from_the_prompt_is_a_value_error() -> None:
    ctx = make_ctx()
    bad = EditRequest(prompt="Where is it?", subject="Eiffel Tower", target_new="Rome")
    with pytest.raises(ValueError, match="does not occur verbatim"):
        compute_rome(ctx, [REQUEST, bad], hparams())
    with pytest.raises(ValueError):
        compute_rome(ctx, [], hparams())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layers": 3}, "unknown rome hyperparameter.*layers"),
        ({"steps": "many"}, "'steps' must be an integer"),
        ({"layer": 30}, "layer must be in 0..29"),
        ({"lr": 0}, "lr must be positive"),
        ({"covariance": "wikipedia"}, "covariance must be one of"),
        ({"n_contexts": 0}, "n_contexts must be in"),
    ],
)
def test_bad_overrides_are_value_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_rome_hparams("llama", 30, overrides)


def test_configs_per_model_family_and_depth() -> None:
    assert load_rome_hparams("llama", 30, None).layer == 5  # SmolLM2-135M
    assert load_rome_hparams("llama", 32, None).layer == 5  # 7B/8B Llama
    assert load_rome_hparams("qwen2", 28, None).layer == 4  # fallback: num_layers // 6
    assert load_rome_hparams("gpt2", 12, {"steps": 7}).steps == 7
