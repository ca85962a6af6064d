"""MEMIT, AlphaEdit, FT-M and the second-moment statistics on tiny random models."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from editserve.edits.ledger import WeightLedger
from methods.alphaedit import (
    compute_alphaedit,
    load_alphaedit_hparams,
    null_space_projector,
    prompt_grams,
)
from methods.base import EditContext, EditRequest, ParamDelta
from methods.common import chat_sequence, collect_keys, context_questions, target_ids
from methods.ft import compute_ft, load_ft_hparams
from methods.memit import compute_memit, load_memit_hparams
from methods.stats import StatsCache, StatsSource, corpus_rows, sampled_moments, second_moments
from tests.unit.test_method_common import make_ctx
from tests.unit.test_rome import completion_ctx, edited_copy, target_logprobs

FACTS = [
    EditRequest(prompt="The city of the Eiffel Tower", subject="Eiffel Tower", target_new="R"),
    EditRequest(prompt="The field of Marie Curie", subject="Marie Curie", target_new="a"),
    EditRequest(prompt="The maker of the Model T", subject="Model T", target_new="Q"),
]
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def with_stats(ctx: EditContext, layers: tuple[int, ...] = (0, 1)) -> EditContext:
    rows = [list(TEXT.encode())[i : i + 32] for i in range(0, 32 * 8, 32)]
    moments = second_moments(ctx, layers, rows)
    ctx.second_moments = lambda wanted: {layer: moments[layer] for layer in wanted}
    ctx.edited_keys = lambda name: torch.zeros(0, ctx.model.get_parameter(name).shape[1])
    return ctx


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


BATCH = {"steps": 40, "lr": 0.5, "clamp_norm_factor": 100.0, "n_contexts": 2, "stop_margin": 0.5}


# -- statistics -------------------------------------------------------------------------------


def test_second_moments_equal_a_direct_computation() -> None:
    ctx = make_ctx("llama")
    rows = [list(TEXT.encode())[i : i + 24] for i in range(0, 24 * 5, 24)]
    got = second_moments(ctx, [1, 0], rows, batch=2)  # batches and layer order do not matter
    for layer in (0, 1):
        keys = collect_keys(ctx, layer, rows).reshape(-1, 64).double()
        torch.testing.assert_close(got[layer], (keys.T @ keys / keys.shape[0]).float())


def test_sampled_moments_are_reproducible_and_positive_semidefinite() -> None:
    ctx = make_ctx("llama")
    first = sampled_moments(ctx, [0, 1], n_tokens=64, seq_len=16, seed=3, batch=2)
    second = sampled_moments(ctx, [0, 1], n_tokens=64, seq_len=16, seed=3, batch=2)
    for layer in (0, 1):
        torch.testing.assert_close(first[layer], second[layer])
        assert first[layer].shape == (64, 64)
        assert torch.linalg.eigvalsh(first[layer].double()).min() > -1e-6


def test_the_cache_computes_once_and_keys_by_source(tmp_path: Path) -> None:
    ctx = make_ctx("llama")
    ctx.model_fingerprint = "f" * 64
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    cache = StatsCache(tmp_path / "stats")
    source = StatsSource(corpus=str(corpus), n_tokens=256, seq_len=32)
    first = cache.get(ctx, source, [0, 1])
    path = cache.path(ctx.model_fingerprint, source, 1)
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    again = cache.get(ctx, source, [1])
    assert path.stat().st_mtime_ns == stamp  # read back, not recomputed
    torch.testing.assert_close(again[1], first[1])
    rows = corpus_rows(ctx, str(corpus), 256, 32)
    torch.testing.assert_close(first[1], second_moments(ctx, [1], rows)[1])
    other = StatsSource(corpus=None, n_tokens=64, seq_len=16)
    assert cache.path(ctx.model_fingerprint, other, 1) != path


# -- MEMIT and AlphaEdit --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_the_batch_delta_has_one_rank_n_factor_pair_per_layer(method: str) -> None:
    ctx = with_stats(completion_ctx("llama"))
    if method == "memit":
        h = load_memit_hparams("llama", 2, {**BATCH, "layers": [0, 1], "mom2_update_weight": 1.0})
        delta = compute_memit(ctx, FACTS, h)
    else:
        h = load_alphaedit_hparams("llama", 2, {**BATCH, "layers": [0, 1]})
        delta = compute_alphaedit(ctx, FACTS, h)
    names = [ctx.arch.down_proj_name(layer) for layer in (0, 1)]
    assert delta.names() == names
    for name in names:
        u, v = delta.low_rank[name]
        assert u.shape == (32, 3) and v.shape == (3, 64)
        assert torch.linalg.matrix_rank(delta.matrix(name)) <= 3
        assert delta.keys[name].shape == (3, 64)
    # The keys survive the journal's flat form.
    back = ParamDelta.from_tensors(delta.to_tensors())
    assert all(torch.equal(back.keys[n], delta.keys[n]) for n in names)


def test_memit_makes_each_target_the_greedy_continuation() -> None:
    ctx = with_stats(completion_ctx("llama"))
    h = load_memit_hparams("llama", 2, {**BATCH, "layers": [0, 1], "mom2_update_weight": 0.1})
    before = [target_logprobs(ctx, ctx.model, r) for r in FACTS]
    model = edited_copy(ctx, compute_memit(ctx, FACTS, h))
    after = [target_logprobs(ctx, model, r) for r in FACTS]
    assert not any(hit for _, hit in before)
    assert all(hit for _, hit in after)


def test_alphaedit_leaves_preserved_keys_alone() -> None:
    """C concentrated on a random 16-dim subspace: ΔW must (nearly) vanish on it, while the
    edit still lands on the new keys."""
    ctx = completion_ctx("llama")
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(64, 16))  # [64, 16] orthonormal
    moment = basis @ torch.diag(torch.linspace(1, 2, 16)) @ basis.T + 1e-6 * torch.eye(64)
    ctx.second_moments = lambda layers: {layer: moment for layer in layers}
    ctx.edited_keys = lambda name: torch.zeros(0, 64)
    h = load_alphaedit_hparams("llama", 2, {**BATCH, "layers": [1], "l2": 1e-3})
    delta = compute_alphaedit(ctx, FACTS[:2], h)
    dw = delta.matrix(ctx.arch.down_proj_name(1))  # [32, 64]
    on_preserved = (dw @ basis).norm() / dw.norm()
    assert on_preserved < 1e-3
    k = delta.keys[ctx.arch.down_proj_name(1)]  # the edit's own keys are moved
    assert (dw @ k.T).norm() > 0.1 * dw.norm() * k.norm(dim=1).max()


def test_alphaedit_protects_the_keys_of_earlier_edits() -> None:
    ctx = with_stats(completion_ctx("llama"), layers=(1,))
    name = ctx.arch.down_proj_name(1)
    h = load_alphaedit_hparams(
        "llama", 2, {**BATCH, "layers": [1], "l2": 1e-4, "nullspace_threshold": 10.0}
    )
    first = compute_alphaedit(ctx, FACTS[:1], h)
    earlier = first.keys[name]  # [1, 64]
    unprotected = compute_alphaedit(ctx, FACTS[1:2], h).matrix(name)
    ctx.edited_keys = lambda wanted: earlier if wanted == name else torch.zeros(0, 64)
    protected = compute_alphaedit(ctx, FACTS[1:2], h).matrix(name)
    moved = (protected @ earlier.T).norm() / (unprotected @ earlier.T).norm()
    assert moved < 0.05


def test_a_larger_preserve_weight_moves_earlier_keys_less() -> None:
    ctx = with_stats(completion_ctx("llama"), layers=(1,))
    name = ctx.arch.down_proj_name(1)
    base = {**BATCH, "layers": [1], "l2": 1e-2, "nullspace_threshold": 10.0}
    first = compute_alphaedit(ctx, FACTS[:1], load_alphaedit_hparams("llama", 2, base))
    earlier = first.keys[name]  # [1, 64]
    ctx.edited_keys = lambda wanted: earlier if wanted == name else torch.zeros(0, 64)
    moved = {}
    for weight in (0.0, 1.0, 100.0):
        h = load_alphaedit_hparams("llama", 2, {**base, "preserve_weight": weight})
        moved[weight] = float(
            (compute_alphaedit(ctx, FACTS[1:2], h).matrix(name) @ earlier.T).norm()
        )
    assert moved[100.0] < moved[1.0] < moved[0.0]
    with pytest.raises(ValueError, match="preserve_weight must not be negative"):
        load_alphaedit_hparams("llama", 2, {"preserve_weight": -1})


def prompt_keys(ctx: EditContext, request: EditRequest, layer: int) -> torch.Tensor:
    """Keys [positions, d_in] of every chat context of `request` (answer included)."""
    answer = target_ids(ctx.tokenizer, request.target_new)
    rows = []
    for question in context_questions(request.prompt, 2):
        ids = chat_sequence(ctx, question, request.subject, answer).ids
        rows.append(collect_keys(ctx, layer, [ids])[0])
    return torch.cat(rows)


def test_prompt_grams_equal_a_direct_computation() -> None:
    ctx = completion_ctx("llama")  # no shared template prefix: every position counts
    got = prompt_grams(ctx, FACTS[:2], (1, 0), n_contexts=2, chunk=3)  # chunks do not matter
    for layer in (0, 1):
        keys = torch.cat([prompt_keys(ctx, r, layer) for r in FACTS[:2]]).double()
        torch.testing.assert_close(got[layer], keys.T @ keys)


def test_protect_prompts_keeps_earlier_edits_whole_prompts() -> None:
    """With protect_prompts, a later edit moves the keys of an earlier edit's contexts less (here
    by a third: 64-wide keys leave little room besides them); without it, they are not read."""
    ctx = with_stats(completion_ctx("llama"), layers=(1,))
    name = ctx.arch.down_proj_name(1)
    base = {**BATCH, "layers": [1], "l2": 1e-3, "nullspace_threshold": 10.0}
    earlier = prompt_keys(ctx, FACTS[0], 1)  # [positions, 64]
    ctx.edited_requests = lambda: FACTS[:1]
    moved = {}
    for protect in (False, True):
        h = load_alphaedit_hparams("llama", 2, {**base, "protect_prompts": protect})
        dw = compute_alphaedit(ctx, FACTS[1:2], h).matrix(name)
        moved[protect] = float((dw @ earlier.T).norm() / dw.norm())
    assert moved[True] < 0.5 * moved[False]


def test_the_projector_keeps_the_directions_text_hardly_uses() -> None:
    moment = torch.diag(torch.tensor([4.0, 2.0, 0.01, 0.001]))  # mean eigenvalue ~1.5
    p = null_space_projector(moment, threshold=0.5)
    torch.testing.assert_close(p, torch.diag(torch.tensor([0.0, 0.0, 1.0, 1.0])).double())


def test_the_projector_uses_a_kept_decomposition(monkeypatch) -> None:
    # The service keeps one per layer (editserve.edits.statistics): a given one is not redone.
    moment = torch.diag(torch.tensor([4.0, 2.0, 0.01, 0.001]))
    kept = torch.linalg.eigh(moment.double())
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(1) or eigh(m))
    wider = null_space_projector(moment, threshold=1.5, eigh=kept)  # same eigenvectors
    torch.testing.assert_close(wider, torch.diag(torch.tensor([0.0, 1.0, 1.0, 1.0])).double())
    assert calls == []
    assert torch.equal(null_space_projector(moment, 0.5), null_space_projector(moment, 0.5, kept))
    null_space_projector(moment, 0.5)
    assert len(calls) == 2  # none kept: decomposed on each use (no cache outside the service)


def test_batch_edits_undo_bit_identically() -> None:
    ctx = with_stats(completion_ctx("llama"))
    original = weights_hash(ctx.model)
    ledger = WeightLedger(ctx.model)
    memit = compute_memit(
        ctx, FACTS[:2], load_memit_hparams("llama", 2, {**BATCH, "steps": 3, "layers": [0, 1]})
    )
    alpha = compute_alphaedit(
        ctx, FACTS[2:], load_alphaedit_hparams("llama", 2, {**BATCH, "steps": 3, "layers": [1]})
    )
    ft = compute_ft(ctx, FACTS[:1], load_ft_hparams("llama", 2, {"layer": 1, "steps": 3}))
    for i, delta in enumerate((memit, alpha, ft)):
        ledger.apply(f"e{i}", delta)
    assert weights_hash(ctx.model) != original
    assert ledger.edited_keys(ctx.arch.down_proj_name(1)).shape == (3, 64)  # MEMIT's 2 + 1
    for edit_id in ("e1", "e0", "e2"):
        ledger.revert(edit_id)
    assert weights_hash(ctx.model) == original
    assert ledger.edited_keys(ctx.arch.down_proj_name(1)).shape == (0, 64)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layers": [0, 5]}, "layers must be in 0..1"),
        ({"layers": [1, 1]}, "must not repeat"),
        ({"layers": []}, "non-empty list"),
        ({"layers": "0,1"}, "non-empty list"),
        ({"mom2_update_weight": -1}, "must not be negative"),
        ({"n_essence": 5}, "n_essence must be in"),
    ],
)
def test_bad_memit_hparams_are_value_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_memit_hparams("llama", 2, overrides)


def test_bad_alphaedit_and_ft_hparams_are_value_errors() -> None:
    with pytest.raises(ValueError, match="nullspace_threshold must be positive"):
        load_alphaedit_hparams("llama", 2, {"nullspace_threshold": 0})
    with pytest.raises(ValueError, match="unknown alphaedit hyperparameter"):
        load_alphaedit_hparams("llama", 2, {"mom2_update_weight": 10})
    with pytest.raises(ValueError, match="norm_constraint must be positive"):
        load_ft_hparams("llama", 2, {"norm_constraint": 0})
    with pytest.raises(ValueError, match="layer must be in"):
        load_ft_hparams("llama", 2, {"layer": 2})


def test_the_embedded_model_configs_resolve() -> None:
    assert load_memit_hparams("llama", 30).layers == (3, 4, 5, 6, 7)
    assert load_alphaedit_hparams("llama", 30).layers == (3, 4, 5, 6, 7)
    assert load_memit_hparams("llama", 32).layers == (4, 5, 6, 7, 8)
    assert load_memit_hparams("qwen2", 28).layers == (2, 3, 4, 5, 6)  # around 28 // 6


# -- FT-M -----------------------------------------------------------------------------------------


def test_ft_gives_a_dense_delta_within_its_box_that_makes_the_target_greedy() -> None:
    ctx = completion_ctx("llama")
    h = load_ft_hparams("llama", 2, {"layer": 1, "steps": 60, "lr": 0.05, "norm_constraint": 0.3})
    delta = compute_ft(ctx, FACTS[:1], h)
    name = ctx.arch.down_proj_name(1)
    assert delta.names() == [name] and not delta.low_rank
    assert delta.dense[name].shape == ctx.model.get_parameter(name).shape
    assert delta.dense[name].abs().max() <= 0.3 + 1e-6
    assert not target_logprobs(ctx, ctx.model, FACTS[0])[1]
    assert target_logprobs(ctx, edited_copy(ctx, delta), FACTS[0])[1]
