"""EditMemory: search, exact removal, persistence, the switch to HNSW, concurrent use."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memory.index import EditMemory, Hit

DIM = 32


def unit(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=-1)  # [n, d]


def filled(n: int, per_edit: int = 2, **kwargs: object) -> tuple[EditMemory, torch.Tensor]:
    """n entries, `per_edit` consecutive ones per edit id e{i // per_edit}."""
    memory = EditMemory(DIM, **kwargs)
    vectors = unit(n)
    for start in range(0, n, per_edit):
        rows = range(start, min(start + per_edit, n))
        memory.add(f"e{start // per_edit}", [{"row": r} for r in rows], vectors[list(rows)])
    return memory, vectors


def top_rows(memory: EditMemory, queries: torch.Tensor, k: int = 1) -> list[list[int]]:
    return [[h.entry["row"] for h in hits] for hits in memory.search(queries, k)]


def as_tuples(results: list[list[Hit]]) -> list[list[tuple[str, int, float]]]:
    return [[(h.edit_id, h.entry["row"], h.score) for h in hits] for hits in results]


def test_add_and_search_exact() -> None:
    memory, vectors = filled(20)
    assert len(memory) == 20 and not memory.approximate
    hits = memory.search(vectors[:3], k=4)
    assert [h[0].entry["row"] for h in hits] == [0, 1, 2]
    assert hits[0][0].edit_id == "e0" and hits[2][0].edit_id == "e1"
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    expected = (vectors[:3] @ vectors.T).topk(4).indices.tolist()  # brute force
    assert top_rows(memory, vectors[:3], k=4) == expected
    assert all(a.score >= b.score for row in hits for a, b in zip(row, row[1:], strict=False))
    assert memory.entries("e1") == [{"row": 2}, {"row": 3}]
    assert memory.edit_ids() == [f"e{i}" for i in range(10)]


@pytest.mark.parametrize("approx_threshold", [50_000, 10])  # flat, then HNSW
def test_a_search_may_return_the_entries_vectors(approx_threshold: int) -> None:
    memory, vectors = filled(20, approx_threshold=approx_threshold)
    memory.remove("e0")  # HNSW keeps it as a tombstone: its row must not be returned
    assert memory.approximate == (approx_threshold == 10)
    hits = memory.search(vectors[2:4], k=3, vectors=True)
    for row in hits:
        for h in row:
            assert h.entry["row"] >= 2
            assert torch.equal(torch.from_numpy(h.vector), vectors[h.entry["row"]])
    assert all(h.vector is None for h in memory.search(vectors[2:4], k=3)[0])


def test_edge_cases() -> None:
    memory = EditMemory(DIM)
    assert memory.search(unit(2), k=3) == [[], []]
    memory.add("a", [{"t": "x"}], unit(1))
    assert len(memory.search(unit(1), k=10)[0]) == 1  # k larger than the memory
    with pytest.raises(ValueError):
        memory.add("a", [{"t": "x"}], torch.zeros(1, DIM + 1))
    with pytest.raises(ValueError):
        memory.add("a", [{"t": "x"}, {"t": "y"}], unit(1))
    with pytest.raises(TypeError):
        memory.add("a", [{"t": object()}], unit(1))
    payload = {"t": ["mutable"]}
    memory.add("b", [payload], unit(1, seed=5))
    payload["t"].append("changed later")
    memory.search(unit(1, seed=5), k=1)[0][0].entry["t"].append("changed by a reader")
    assert memory.entries("b") == [{"t": ["mutable"]}]


def test_remove_is_exact() -> None:
    memory, vectors = filled(20)
    assert memory.remove("e3") == 2 and memory.remove("e3") == 0 and memory.remove("nope") == 0
    assert len(memory) == 18 and "e3" not in memory.edit_ids()
    results = memory.search(vectors, k=18)
    assert all(h.edit_id != "e3" for hits in results for h in hits)
    # Rows after the removed ones still map to their own payloads.
    assert top_rows(memory, vectors[[5, 8, 19]]) == [[5], [8], [19]]


def reloaded(memory: EditMemory, folder: Path) -> EditMemory:
    """`memory` through its snapshot, written to and read from a safetensors file."""
    save_file(memory.to_tensors(), str(folder / "memory.safetensors"))
    return EditMemory.from_tensors(load_file(str(folder / "memory.safetensors")))


def test_snapshot_and_reload_flat(tmp_path: Path) -> None:
    memory, vectors = filled(30)
    memory.remove("e2")
    queries = unit(5, seed=1)
    before = as_tuples(memory.search(queries, k=5))
    restored = reloaded(memory, tmp_path)
    assert as_tuples(restored.search(queries, k=5)) == before
    restored.add("new", [{"row": 99}], vectors[:1])  # a restored memory keeps working
    assert len(restored) == len(memory) + 1


def test_switches_to_hnsw_and_still_finds_neighbours(tmp_path: Path) -> None:
    memory, vectors = filled(150, approx_threshold=200)
    assert not memory.approximate
    g = torch.Generator().manual_seed(3)
    more = unit(150, seed=9)
    for i in range(150):
        memory.add(f"f{i}", [{"row": 150 + i}], more[i : i + 1])
    assert memory.approximate and len(memory) == 300
    everything = torch.cat([vectors, more])
    noisy = torch.nn.functional.normalize(everything + 0.01 * torch.randn(300, DIM, generator=g))
    assert top_rows(memory, noisy) == [[r] for r in range(300)]

    # Tombstones: removed entries never come back, k live hits still come back.
    for i in range(20):
        memory.remove(f"f{i}")
    assert memory.approximate and len(memory) == 280
    results = memory.search(everything, k=5)
    assert all(h.edit_id not in {f"f{i}" for i in range(20)} for r in results for h in r)
    assert all(len(r) == 5 for r in results)
    assert top_rows(memory, noisy[170:]) == [[r] for r in range(170, 300)]

    # Exact restore, HNSW graph and tombstones included.
    before = as_tuples(memory.search(noisy, k=3))
    restored = reloaded(memory, tmp_path)
    assert restored.approximate and as_tuples(restored.search(noisy, k=3)) == before

    # Many removals: a rebuild; below the threshold again, back to exact search.
    for i in range(20, 150):
        memory.remove(f"f{i}")
    assert not memory.approximate and len(memory) == 150
    assert top_rows(memory, vectors, k=150) == (vectors @ vectors.T).topk(150).indices.tolist()


def test_concurrent_searches_and_writes() -> None:
    memory, vectors = filled(100, approx_threshold=150)
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                for hits in memory.search(vectors[:8], k=4):
                    assert 1 <= len(hits) <= 4
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    extra = unit(100, seed=4)
    for i in range(100):  # crosses the threshold: HNSW built while searches run
        memory.add(f"x{i}", [{"row": 1000 + i}], extra[i : i + 1])
    assert memory.approximate
    for i in range(80):  # tombstones, an HNSW rebuild, then back to flat
        assert memory.remove(f"x{i}") == 1
        gone = f"x{i}"
        assert all(h.edit_id != gone for r in memory.search(extra, k=10) for h in r)
    assert not memory.approximate
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(memory) == 120
