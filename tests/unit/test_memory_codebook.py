"""GRACE codebook: replacement inside a key's radius only, the add rules, exact removal,
persistence, and value training, on a tiny random Llama's down-projection."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from memory.codebook import Codebook, Decision
from memory.value_training import train_value
from tests.conftest import tiny_model

LAYER = 1
Llama = tuple[nn.Module, nn.Linear, PreTrainedTokenizerBase]  # model, down_proj, tokenizer


@pytest.fixture(scope="module")
def llama() -> Llama:
    loaded = tiny_model("llama")
    return loaded.model, loaded.model.model.layers[LAYER].mlp.down_proj, loaded.tokenizer


def run(
    model: nn.Module, module: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [B, T, V], down_proj inputs [B, T, d_ff] and outputs [B, T, d] as served.

    The recording hook is registered last, so it sees the output after any codebook hook.
    """
    seen: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(
        lambda _m, i, o: seen.update(keys=i[0].detach(), outs=o.detach())
    )
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
    finally:
        handle.remove()
    return logits, seen["keys"], seen["outs"]


def ids(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])  # [1, T]


PROMPT, OTHER = "The capital of France is", "Bananas are yellow."


def edited(llama: Llama, radius_share: float = 0.5) -> tuple[Codebook, torch.Tensor, torch.Tensor]:
    """A codebook with one entry at PROMPT's last token; radius below every other position."""
    model, module, tok = llama
    _, keys_a, _ = run(model, module, ids(tok, PROMPT))
    _, keys_b, _ = run(model, module, ids(tok, OTHER))
    key = keys_a[0, -1]
    others = torch.cat([keys_a[0, :-1], keys_b[0]])  # every other position seen
    radius = radius_share * float((others - key).norm(dim=1).min())
    value = 3 * torch.randn(module.out_features)
    codebook = Codebook(radius=radius)
    assert codebook.add("e1", key, "Paris", value).decision is Decision.NEW
    return codebook, key, value


def test_hit_replaces_output_miss_is_bit_identical(llama: Llama) -> None:
    model, module, tok = llama
    a, b = ids(tok, PROMPT), ids(tok, OTHER)
    base_a, _, outs_a = run(model, module, a)
    base_b, _, _ = run(model, module, b)
    codebook, _, value = edited(llama)
    handle = codebook.attach(module)
    try:
        logits_a, _, served = run(model, module, a)
        assert torch.equal(served[0, -1], value)
        assert torch.equal(served[0, :-1], outs_a[0, :-1])
        assert torch.equal(logits_a[0, :-1], base_a[0, :-1])  # causal: earlier tokens untouched
        assert not torch.allclose(logits_a[0, -1], base_a[0, -1])
        assert torch.equal(run(model, module, b)[0], base_b)  # outside every radius

        # Batched, left-padded: only the row whose last token hits changes.
        pad = a.shape[1] - b.shape[1]
        batch = torch.cat([a, torch.cat([torch.full((1, pad), tok.pad_token_id), b], 1)])
        mask = torch.ones_like(batch)
        mask[1, :pad] = 0
        handle.remove()
        plain, _, plain_outs = run(model, module, batch, mask)
        handle = codebook.attach(module)
        logits, _, served = run(model, module, batch, mask)
        assert torch.equal(served[0, -1], value) and torch.equal(logits[1], plain[1])
        assert torch.equal(served[0, :-1], plain_outs[0, :-1])
    finally:
        handle.remove()


def test_rules() -> None:
    e = torch.eye(8)
    cb = Codebook(radius=1.0, tolerance=1e-3)
    v = {name: torch.full((4,), float(i)) for i, name in enumerate("ABCDE")}
    k0 = torch.zeros(8)
    assert cb.add("e0", k0, "A", v["A"]).decision is Decision.NEW
    assert cb.plan(1.5 * e[0], "A").decision is Decision.EXPAND and len(cb) == 1  # plan is dry
    assert cb.add("e1", 1.5 * e[0], "A", None).decision is Decision.EXPAND
    assert len(cb) == 1 and cb.describe()[0]["radius"] == pytest.approx(1.501)
    assert bool(cb.lookup(1.5 * e[0])[1])  # the expanded region holds the new key
    assert cb.add("e2", 0.5 * e[1], "A", None).decision is Decision.COVER and len(cb) == 1
    assert cb.add("e3", -3 * e[0], "B", v["B"]).decision is Decision.NEW  # 3 > 1 + 1.501
    with pytest.raises(ValueError):  # a new entry needs a value; nothing changes
        cb.add("bad", 10 * e[2], "Z", None)
    with pytest.raises(ValueError):  # the key size is the module's input size
        cb.add("bad", torch.zeros(9), "A", v["A"])
    assert len(cb) == 2 and "bad" not in cb.edit_ids()

    # Split: conflicting label at distance 1 from k0: both radii fall to about 1/2.
    assert cb.add("e4", e[2], "C", v["C"]).decision is Decision.SPLIT
    radii = [d["radius"] for d in cb.describe()]
    assert radii[0] == pytest.approx(0.5 - 1e-5) and radii[2] == 0.5
    assert radii[0] + radii[2] < 1.0  # the two regions no longer overlap
    assert cb.lookup(e[2])[0].item() == 2 and bool(cb.lookup(e[2])[1])
    assert cb.lookup(0.45 * e[2])[0].item() == 0 and bool(cb.lookup(0.45 * e[2])[1])
    assert not bool(cb.lookup(0.75 * e[0])[1])  # was inside before the split shrank it

    # Supersede: a conflicting edit at the same key replaces the entry; undo brings it back.
    assert cb.add("e5", -3 * e[0], "D", v["D"]).decision is Decision.SUPERSEDE
    assert len(cb) == 3 and cb.describe()[1]["label"] == "D"
    assert cb.remove("e5") == 1 and cb.describe()[1]["label"] == "B"
    assert cb.describe()[1]["owners"] == ["e3"]

    # Edits that only widened e0's entry (no value of their own) go with it.
    assert cb.remove("e0") == 1
    assert [d["owners"] for d in cb.describe()] == [["e3"], ["e4"]]


def probe_outputs(cb: Codebook, points: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)  # the same layer every call
    layer = nn.Linear(points.shape[1], 4)
    handle = cb.attach(layer)
    try:
        with torch.no_grad():
            return layer(points)
    finally:
        handle.remove()


def ops() -> list[tuple[str, torch.Tensor, str, torch.Tensor]]:
    """Keys near 4 centres with mixed labels, then a repeat and a relabel: every rule fires."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 8, generator=g) * 2
    out = []
    for i in range(12):
        key = centres[i % 4] + 0.4 * torch.randn(8, generator=g)
        out.append((f"e{i}", key, "AB"[i % 3 == 0], torch.randn(4, generator=g)))
    out.append(("e12", out[11][1] + 1e-4, out[11][2], torch.randn(4, generator=g)))
    out.append(("e13", out[9][1], "C", torch.randn(4, generator=g)))
    return out


def test_remove_equals_never_added() -> None:
    points = torch.stack([k for _, k, _, _ in ops()]) + 0.05  # [14, 8] near every key
    full = Codebook(radius=1.0)
    kinds = {full.add(*op).decision for op in ops()}
    assert kinds == set(Decision)
    for gone in ("e0", "e5", "e9", "e11", "e13"):
        cb = Codebook(radius=1.0)
        for op in ops():
            cb.add(*op)
        assert cb.remove(gone) == 1 and gone not in cb.edit_ids()
        ref = Codebook(radius=1.0)
        for op in ops():
            if op[0] != gone:
                ref.add(*op)
        assert cb.describe() == ref.describe()
        assert torch.equal(probe_outputs(cb, points), probe_outputs(ref, points))


def test_removal_restores_model_bit_identically(llama: Llama) -> None:
    model, module, tok = llama
    a, b = ids(tok, PROMPT), ids(tok, OTHER)
    base_a, base_b = run(model, module, a)[0], run(model, module, b)[0]
    codebook, _, _ = edited(llama)
    _, keys_b, _ = run(model, module, b)
    codebook.add("e2", keys_b[0, -1], "Yellow", torch.randn(module.out_features))
    handle = codebook.attach(module)
    try:
        assert not torch.equal(run(model, module, b)[0], base_b)
        codebook.remove("e2")
        assert torch.equal(run(model, module, b)[0], base_b)
        assert not torch.equal(run(model, module, a)[0], base_a)
        codebook.remove("e1")
        assert len(codebook) == 0
        assert torch.equal(run(model, module, a)[0], base_a)
    finally:
        handle.remove()


def test_persist_and_reload(tmp_path: Path) -> None:
    cb = Codebook(radius=1.0)
    for op in ops():
        cb.add(*op)
    cb.add("covered", ops()[0][1], ops()[0][2], None)  # an op without a value
    save_file(cb.to_tensors(), str(tmp_path / "cb.safetensors"))
    restored = Codebook.from_tensors(load_file(str(tmp_path / "cb.safetensors")))
    points = torch.stack([k for _, k, _, _ in ops()]) + 0.05
    assert restored.describe() == cb.describe() and restored.edit_ids() == cb.edit_ids()
    assert torch.equal(probe_outputs(restored, points), probe_outputs(cb, points))
    assert Codebook.from_tensors(Codebook().to_tensors()).describe() == []


def test_train_value_makes_the_model_say_the_target(llama: Llama) -> None:
    model, module, tok = llama
    a = ids(tok, PROMPT)
    _, keys, outs = run(model, module, a)
    target = tok.convert_tokens_to_ids("Z")
    codebook = Codebook(radius=1.0)

    def loss_fn(v: torch.Tensor) -> torch.Tensor:
        with codebook.attached(module, keys[0, -1], "Z", v) as plan:
            assert plan is not None and plan.decision is Decision.NEW
            logits = model(input_ids=a).logits[0, -1]  # [V]
        return nn.functional.cross_entropy(logits[None], torch.tensor([target]))

    # A random tiny model's logits are small, so the loss plateaus high; the argmax moves.
    fit = train_value(loss_fn, outs[0, -1], steps=20, lr=0.1)
    assert fit.loss < fit.losses[0] and not fit.converged
    assert len(codebook) == 0  # training left the codebook alone
    codebook.add("e1", keys[0, -1], "Z", fit.value)
    handle = codebook.attach(module)
    try:
        assert run(model, module, a)[0][0, -1].argmax().item() == target
    finally:
        handle.remove()


def test_train_value_stops_and_clamps() -> None:
    goal = torch.tensor([3.0, 4.0])

    def loss_fn(v: torch.Tensor) -> torch.Tensor:
        return ((v - goal) ** 2).sum()

    fit = train_value(loss_fn, torch.zeros(2), steps=500, lr=0.1, stop_below=1e-4)
    assert fit.converged and fit.loss < 1e-4 and len(fit.losses) < 500
    assert torch.allclose(fit.value, goal, atol=1e-2)
    clamped = train_value(loss_fn, torch.zeros(2), 200, lr=0.1, optimizer="sgd", max_norm=1.0)
    assert not clamped.converged and clamped.value.norm() <= 1.0 + 1e-6
    assert torch.allclose(clamped.value, goal / 5, atol=1e-2)  # the closest point on the ball
    with pytest.raises(ValueError):
        train_value(loss_fn, torch.zeros(2), optimizer="lbfgs")


def test_serving_while_edits_change() -> None:
    """The hook reads whole snapshots: no errors, and every output is a valid one."""
    cb = Codebook(radius=1.0)
    points = torch.stack([k for _, k, _, _ in ops()])  # [14, 8]
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        try:
            while not stop.is_set():
                nearest, hit = cb.lookup(points)
                assert nearest.shape == hit.shape == (14,)
                probe_outputs(cb, points)
        except BaseException as e:  # reported below
            errors.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    for _ in range(5):
        for op in ops():
            cb.add(*op)
        for op in ops():
            cb.remove(op[0])
    stop.set()
    thread.join()
    assert not errors, errors
    assert len(cb) == 0
