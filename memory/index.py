"""`EditMemory`: embedded entries of edits, searched by inner product with FAISS.

Each entry is (edit id, payload dict, embedding). Exact search (`IndexFlatIP`) while the memory
is small; past `approx_threshold` live entries it switches to HNSW on inner product, which
searches in roughly log time but cannot delete. Removal is exact either way:
- flat: the rows are dropped and the index rebuilt at once (a memory copy, cheap);
- HNSW: the rows become tombstones that every search filters out (a FAISS ID selector, so a
  search still returns k live hits), and the graph is rebuilt once tombstones pass
  `max_dead_fraction` of the rows.

Threads: searches (request handlers) and writes (the edit service) may run concurrently. Writes
are serialised by one lock; the state a search reads is guarded by another, held only briefly
by writers, so the slow part of a write (building an HNSW graph: tens of seconds at 100k
entries on 2 cores) never blocks searches. Searches are serialised with each other (about 1 ms
each at 10k entries); adding to a large HNSW graph holds them up for ~0.1 s (FAISS allocates a
lock per node on every add).
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import torch

from memory.json_tensors import json_tensor, tensor_json


@dataclass(frozen=True)
class Hit:
    edit_id: str
    entry: dict[str, Any]  # a copy of the payload given to `add`
    score: float  # inner product (cosine for unit-norm embeddings)
    vector: np.ndarray | None = None  # the entry's embedding, when the search asked for it


@dataclass
class _State:
    """What a search reads; row r is FAISS id r. The index holds the only copy of the vectors."""

    index: faiss.Index
    approximate: bool
    edit_ids: list[str] = field(default_factory=list)
    payloads: list[dict[str, Any]] = field(default_factory=list)
    alive: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # [rows]
    bitmap: np.ndarray | None = None  # alive rows as FAISS's little-endian bitmap, HNSW only

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """A copy of the given rows' vectors: [len(rows), d]."""
        every = self.index.reconstruct_n(0, self.index.ntotal)  # [n, d]
        return every[rows]


class EditMemory:
    """Entries of edits, searchable by inner product; thread-safe; snapshots exactly."""

    def __init__(
        self,
        dim: int,
        approx_threshold: int = 50_000,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 256,
        max_dead_fraction: float = 0.2,
    ) -> None:
        self.dim = dim
        self.approx_threshold = approx_threshold
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.max_dead_fraction = max_dead_fraction
        self._write_lock = threading.Lock()  # one writer at a time
        self._lock = threading.Lock()  # guards self._state against the writer's swaps
        self._state = self._build(np.zeros((0, dim), np.float32), [], [], approximate=False)

    # --- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return int(self._state.alive.sum())

    @property
    def approximate(self) -> bool:
        with self._lock:
            return self._state.approximate

    def edit_ids(self) -> list[str]:
        """Edit ids with at least one entry, in order of first addition."""
        with self._lock:
            s = self._state
            return list(dict.fromkeys(e for e, a in zip(s.edit_ids, s.alive, strict=True) if a))

    def entries(self, edit_id: str) -> list[dict[str, Any]]:
        with self._lock:
            s = self._state
            return [
                copy.deepcopy(p)
                for e, p, a in zip(s.edit_ids, s.payloads, s.alive, strict=True)
                if a and e == edit_id
            ]

    def search(self, queries: torch.Tensor, k: int, vectors: bool = False) -> list[list[Hit]]:
        """The k entries of highest inner product for each query ([q, d]), best first; with
        `vectors`, each hit carries its entry's embedding."""
        q = self._as_matrix(queries)  # [q, d]
        with self._lock:
            s = self._state
            live = int(s.alive.sum())
            if live == 0 or k <= 0 or len(q) == 0:
                return [[] for _ in range(len(q))]
            k = min(k, live)
            if s.approximate:
                params = faiss.SearchParametersHNSW()
                params.efSearch = max(self.ef_search, k)
                if s.bitmap is not None:  # tombstones present: search only live rows
                    selector = faiss.IDSelectorBitmap(len(s.alive), faiss.swig_ptr(s.bitmap))
                    params.sel = selector
                scores, ids = s.index.search(q, k, params=params)  # [q, k] each
            else:
                scores, ids = s.index.search(q, k)  # flat keeps no tombstones
            return [
                [
                    Hit(
                        s.edit_ids[i],
                        copy.deepcopy(s.payloads[i]),
                        float(sc),
                        s.index.reconstruct(i) if vectors else None,
                    )
                    for i, sc in zip(row_ids.tolist(), row_scores.tolist(), strict=True)
                    if i >= 0
                ]
                for row_ids, row_scores in zip(ids, scores, strict=True)
            ]

    # --- writing -------------------------------------------------------------------------

    def add(self, edit_id: str, entries: list[dict[str, Any]], embeddings: torch.Tensor) -> None:
        """Adds entries of `edit_id` (an edit may add entries more than once)."""
        vectors = self._as_matrix(embeddings)  # [n, d]
        if len(entries) != len(vectors):
            raise ValueError(f"{len(entries)} entries but {len(vectors)} embeddings")
        # Round-trip through JSON now so `to_tensors` can never fail on them, and so later
        # changes to the caller's dicts cannot reach the memory.
        payloads = [json.loads(json.dumps(p)) for p in entries]
        with self._write_lock:
            s = self._state
            live = int(s.alive.sum()) + len(vectors)
            if not s.approximate and live > self.approx_threshold:
                # Build the graph outside the search lock; no other writer runs meanwhile.
                keep = np.flatnonzero(s.alive)
                new = self._build(
                    np.concatenate([s.vectors(keep), vectors]),
                    [s.edit_ids[i] for i in keep] + [edit_id] * len(vectors),
                    [s.payloads[i] for i in keep] + payloads,
                    approximate=True,
                )
                with self._lock:
                    self._state = new
                return
            with self._lock:
                s.index.add(vectors)
                s.alive = np.concatenate([s.alive, np.ones(len(vectors), dtype=bool)])
                s.edit_ids.extend([edit_id] * len(vectors))
                s.payloads.extend(payloads)
                if s.bitmap is not None:
                    s.bitmap = np.packbits(s.alive, bitorder="little")

    def remove(self, edit_id: str) -> int:
        """Removes every entry of `edit_id`; returns how many. No search returns them after."""
        with self._write_lock:
            s = self._state
            rows = np.array([i for i, e in enumerate(s.edit_ids) if e == edit_id], dtype=np.int64)
            rows = rows[s.alive[rows]] if len(rows) else rows
            if len(rows) == 0:
                return 0
            alive = s.alive.copy()
            alive[rows] = False
            dead_fraction = 1.0 - alive.sum() / len(alive)
            if s.approximate and dead_fraction <= self.max_dead_fraction:
                with self._lock:  # tombstones: cheap, and exact through the selector
                    s.alive = alive
                    s.bitmap = np.packbits(alive, bitorder="little")
                return len(rows)
            keep = np.flatnonzero(alive)
            new = self._build(
                s.vectors(keep),
                [s.edit_ids[i] for i in keep],
                [s.payloads[i] for i in keep],
                approximate=len(keep) > self.approx_threshold,
            )
            with self._lock:
                self._state = new
            return len(rows)

    # --- snapshots -----------------------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat dict of tensors (metadata as JSON bytes) that `from_tensors` restores exactly.

        The HNSW graph is stored as built: rebuilding it could give other approximate results.
        """
        with self._lock:
            s = self._state
            meta = {"config": self._config(), "edit_ids": s.edit_ids, "payloads": s.payloads}
            flat = {"alive": torch.from_numpy(s.alive.astype(np.uint8)), "meta": json_tensor(meta)}
            if s.approximate:  # the graph holds the vectors too
                flat["hnsw"] = torch.from_numpy(faiss.serialize_index(s.index))
            else:
                flat["vectors"] = torch.from_numpy(s.vectors(np.arange(len(s.alive))))
            return flat

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> EditMemory:
        meta = tensor_json(flat["meta"])
        memory = cls(**meta["config"])
        alive = flat["alive"].numpy().astype(bool)
        approximate = "hnsw" in flat
        if approximate:
            index = faiss.deserialize_index(flat["hnsw"].numpy().copy())
        else:
            index = faiss.IndexFlatIP(memory.dim)
            index.add(np.ascontiguousarray(flat["vectors"].numpy(), dtype=np.float32))
        bitmap = None if alive.all() or not approximate else np.packbits(alive, bitorder="little")
        memory._state = _State(
            index, approximate, meta["edit_ids"], meta["payloads"], alive, bitmap
        )
        return memory

    # --- internals -----------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "approx_threshold": self.approx_threshold,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "max_dead_fraction": self.max_dead_fraction,
        }

    def _as_matrix(self, x: torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(x).detach().to("cpu", torch.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected [n, {self.dim}] embeddings, got {list(x.shape)}")
        return np.ascontiguousarray(x.numpy())

    def _build(
        self,
        vectors: np.ndarray,
        edit_ids: list[str],
        payloads: list[dict[str, Any]],
        approximate: bool,
    ) -> _State:
        if approximate:
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
        else:
            index = faiss.IndexFlatIP(self.dim)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index.add(vectors)
        alive = np.ones(len(vectors), dtype=bool)
        return _State(index, approximate, list(edit_ids), list(payloads), alive)
