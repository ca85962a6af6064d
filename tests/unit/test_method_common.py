"""Shared locate-then-edit steps: subject location, contexts, keys, replay, deltas, hparams."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from methods import hparams
from methods.architectures import resolve
from methods.base import EditContext
from methods.common import (
    CONTEXT_PREFIXES,
    ChatSequence,
    added_low_rank,
    chat_sequence,
    collect_keys,
    context_questions,
    subject_last_index,
    target_ids,
)
from methods.hparams import load_hparams
from methods.suffix_replay import SuffixReplay
from methods.value_optimiser import ValueGroup, ValueSettings, optimise_values
from tests.conftest import tiny_model


def make_ctx(kind: str = "llama", system: str | None = None) -> EditContext:
    loaded = tiny_model(kind)
    tok = loaded.tokenizer

    def chat_prompt(question: str) -> list[int]:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        return tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )

    return EditContext(
        model=loaded.model, tokenizer=tok, arch=resolve(loaded.model), chat_prompt=chat_prompt
    )


def test_subject_last_token_is_found_in_the_user_turn() -> None:
    # The system prompt names the subject too: the edit must key on the user's mention.
    ctx = make_ctx(system="You talk about the Eiffel Tower a lot.")
    question = "Where is the Eiffel Tower?"
    ids = ctx.chat_prompt(question)
    pos = subject_last_index(ctx.tokenizer, ids, question, "Eiffel Tower")
    text = ctx.tokenizer.decode(ids[: pos + 1])
    assert text.endswith("user\nWhere is the Eiffel Tower")


def test_subject_not_in_the_prompt_is_a_value_error() -> None:
    ctx = make_ctx()
    question = "Where is the Eiffel Tower?"
    with pytest.raises(ValueError, match="does not occur verbatim"):
        subject_last_index(ctx.tokenizer, ctx.chat_prompt(question), question, "Louvre")
    with pytest.raises(ValueError, match="empty"):
        subject_last_index(ctx.tokenizer, ctx.chat_prompt(question), question, " ")


def test_context_questions_are_fixed_and_start_with_the_bare_prompt() -> None:
    got = context_questions("Q?", 4)
    assert got == context_questions("Q?", 4)
    assert got[0] == "Q?" and all(q.endswith(" Q?") for q in got[1:])
    assert len(context_questions("Q?", len(CONTEXT_PREFIXES))) == len(CONTEXT_PREFIXES)
    with pytest.raises(ValueError):
        context_questions("Q?", 0)


def test_target_ids_have_no_leading_space() -> None:
    ctx = make_ctx()
    assert ctx.tokenizer.decode(target_ids(ctx.tokenizer, " Rome")) == "Rome"
    with pytest.raises(ValueError):
        target_ids(ctx.tokenizer, "  ")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_collect_keys_are_the_down_projection_inputs(kind: str) -> None:
    ctx = make_ctx(kind)
    seqs = [ctx.chat_prompt("Hello there"), ctx.chat_prompt("Hi")]
    keys = collect_keys(ctx, 1, seqs)  # [B, T, d_in]
    seen: list[torch.Tensor] = []
    handle = ctx.arch.down_proj(1).register_forward_pre_hook(lambda _, i: seen.append(i[0]))
    with torch.no_grad():
        ctx.model(torch.tensor([seqs[1]]))
    handle.remove()
    assert keys.shape[:2] == (2, len(seqs[0]))
    torch.testing.assert_close(keys[1, : len(seqs[1])], seen[0][0])


@pytest.mark.parametrize("from_block", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_suffix_replay_matches_a_full_forward_with_delta(kind: str, from_block: bool) -> None:
    ctx = make_ctx(kind)
    answer = target_ids(ctx.tokenizer, "Rome")
    seqs = [
        chat_sequence(ctx, q, "Eiffel Tower", answer)
        for q in context_questions("Where is the Eiffel Tower located?", 3)
    ]
    seqs.append(chat_sequence(ctx, "What is the Eiffel Tower?", "Eiffel Tower"))
    module = ctx.arch.down_proj(0)
    replay = SuffixReplay(ctx, 0, module, seqs, from_block=from_block)
    # GPT-2 adds position embeddings to `inputs_embeds`: the replay sees it and runs every block.
    assert replay.from_block == (from_block and kind != "gpt2")
    delta = torch.randn(replay.v0.shape) * 3  # one δ per row [B, d_out]
    with torch.no_grad():
        hidden = replay.hidden(delta)
        # A replay of some rows gives those rows' states.
        part = replay.rows(torch.tensor([2, 0]))
        torch.testing.assert_close(part.hidden(delta[[2, 0]]), hidden[[2, 0]])
    for b, seq in enumerate(seqs):

        def add(
            _: torch.nn.Module, __: tuple, out: torch.Tensor, p: int = seq.subject_pos, b: int = b
        ) -> torch.Tensor:
            out = out.clone()
            out[:, p] += delta[b]
            return out

        handle = module.register_forward_hook(add)
        with torch.no_grad():
            ref = ctx.model.base_model(torch.tensor([seq.ids])).last_hidden_state[0]
        handle.remove()
        n = len(seq.ids) - seq.subject_pos
        torch.testing.assert_close(hidden[b, :n], ref[seq.subject_pos :], atol=1e-4, rtol=1e-4)


def test_suffix_replay_from_block_gives_the_same_gradient() -> None:
    ctx = make_ctx("llama")
    answer = target_ids(ctx.tokenizer, "Rome")
    seqs = [
        chat_sequence(ctx, q, "Eiffel Tower", answer)
        for q in context_questions("Where is the Eiffel Tower located?", 2)
    ]
    module = ctx.arch.down_proj(1)
    grads = []
    for from_block in (False, True):
        replay = SuffixReplay(ctx, 1, module, seqs, from_block=from_block)
        assert replay.from_block == from_block
        delta = torch.zeros(replay.v0.shape, requires_grad=True)
        weights = torch.linspace(-1, 1, replay.v0.shape[-1])  # any fixed function of the states
        real = replay.cols < replay.lengths[:, None]  # [B, S]: columns inside each row
        ((replay.hidden(delta) @ weights).square() * real).sum().backward()
        grads.append(delta.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_added_low_rank_equals_adding_to_a_weight_copy(kind: str) -> None:
    ctx = make_ctx(kind)
    name = ctx.arch.down_proj_name(1)
    weight = ctx.model.get_parameter(name)
    u, v = torch.randn(weight.shape[0], 2), torch.randn(2, weight.shape[1])
    ids = torch.tensor([ctx.chat_prompt("Hello")])
    with torch.no_grad(), added_low_rank(ctx, {name: (u, v)}):
        hooked = ctx.model(ids).logits
    edited = copy.deepcopy(ctx.model)
    with torch.no_grad():
        edited.get_parameter(name).add_(u @ v)
        torch.testing.assert_close(hooked, edited(ids).logits, atol=1e-4, rtol=1e-4)


@dataclass(frozen=True)
class _Params:
    layer: int
    steps: int = 3
    lr: float = 0.5
    name: str = "x"
    flag: bool = False


@pytest.fixture
def _bare_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config folder whose only method, no-such-method, has an empty default.yaml."""
    (tmp_path / "no-such-method").mkdir()
    (tmp_path / "no-such-method" / "default.yaml").write_text("hparams: {}\n")
    monkeypatch.setattr(hparams, "CONFIG_ROOT", tmp_path)


@pytest.mark.usefixtures("_bare_method")
def test_hparams_defaults_fall_back_to_a_sixth_of_the_depth() -> None:
    got = load_hparams(_Params, "no-such-method", "t5", 24, {"lr": 1})
    assert got == _Params(layer=4, lr=1.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"stepz": 3}, "unknown no-such-method hyperparameter.*stepz"),
        ({"steps": "3"}, "'steps' must be an integer"),
        ({"steps": 2.5}, "'steps' must be an integer"),
        ({"steps": True}, "'steps' must be an integer"),
        ({"lr": "fast"}, "'lr' must be a number"),
        ({"flag": 1}, "'flag' must be true or false"),
        ([("steps", 3)], "must be a mapping"),
    ],
)
@pytest.mark.usefixtures("_bare_method")
def test_hparams_overrides_are_checked(overrides: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_hparams(_Params, "no-such-method", "llama", 12, overrides)  # type: ignore[arg-type]


def _fact_rows(
    ctx: EditContext, facts: list[tuple[str, str, str]]
) -> tuple[list[ChatSequence], list[ValueGroup]]:
    """Per (question, subject, target): 2 context rows and 1 essence row, as MEMIT builds them."""
    seqs, groups = [], []
    for question, subject, target in facts:
        answer = target_ids(ctx.tokenizer, target)
        rewrites = [chat_sequence(ctx, q, subject, answer) for q in context_questions(question, 2)]
        essence = [chat_sequence(ctx, f"What is {subject}?", subject)]
        first = len(seqs)
        seqs += [*rewrites, *essence]
        groups.append(ValueGroup((first, first + 1), (first + 2,), (tuple(answer),)))
    return seqs, groups


def test_values_optimised_together_equal_values_optimised_one_by_one() -> None:
    ctx = make_ctx("llama")
    module = ctx.arch.down_proj(1)
    facts = [
        ("Where is the Eiffel Tower?", "Eiffel Tower", "Rome"),
        ("Who wrote Hamlet?", "Hamlet", "Tolstoy"),
    ]
    settings = ValueSettings(
        steps=6, lr=0.5, kl_factor=0.1, weight_decay=0.01, clamp_norm_factor=3.0, stop_margin=0.0
    )
    seqs, groups = _fact_rows(ctx, facts)
    together = optimise_values(ctx, SuffixReplay(ctx, 1, module, seqs), groups, settings)
    for i, group in enumerate(groups):
        rows = list(group.rewrite_rows + group.essence_rows)
        alone_group = ValueGroup((0, 1), (2,), group.answers)
        replay = SuffixReplay(ctx, 1, module, [seqs[r] for r in rows])
        (alone,) = optimise_values(ctx, replay, [alone_group], settings)
        assert alone.steps == together[i].steps
        torch.testing.assert_close(alone.delta, together[i].delta, atol=1e-4, rtol=1e-3)
        assert alone.delta.norm() <= 3.0 * alone.v0_norm + 1e-4  # the norm ball holds


def test_chunked_replay_and_optimisation_equal_one_pass() -> None:
    # Rows of different lengths: chunks pad only to their own longest, and gradients accumulate
    # over chunks, so one row per chunk must give what one pass over all rows gives.
    ctx = make_ctx("llama")
    module = ctx.arch.down_proj(1)
    facts = [
        ("Where is the Eiffel Tower in the city of lights?", "Eiffel Tower", "Rome"),
        ("Who wrote Hamlet?", "Hamlet", "Leo Tolstoy of Russia"),
        ("Which company makes the iPhone?", "iPhone", "Nokia"),
    ]
    settings = ValueSettings(
        steps=5, lr=0.5, kl_factor=0.1, weight_decay=0.01, clamp_norm_factor=3.0, stop_margin=0.0
    )
    seqs, groups = _fact_rows(ctx, facts)
    one_pass = SuffixReplay(ctx, 1, module, seqs, chunk_tokens=10**6)
    by_row = SuffixReplay(ctx, 1, module, seqs, chunk_tokens=1)
    assert len({len(s.ids) for s in seqs}) > 1  # the chunks really differ in width
    for name in ("keys", "v0", "full_hidden"):
        a, b = getattr(one_pass, name), getattr(by_row, name)
        if a.dim() == 3:  # [B, T, d]: compare real positions (chunks pad less)
            real = torch.arange(a.shape[1])[None, :] < one_pass.lengths[:, None]
            a, b = a[real], b[real]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    together = optimise_values(ctx, one_pass, groups, settings, chunk_tokens=10**6)
    chunked = optimise_values(ctx, by_row, groups, settings, chunk_tokens=1)
    for a, b in zip(together, chunked, strict=True):
        assert a.steps == b.steps
        torch.testing.assert_close(a.delta, b.delta, atol=1e-4, rtol=1e-3)
        assert a.nll == pytest.approx(b.nll, rel=1e-4, abs=1e-5)
