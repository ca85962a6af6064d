"""The live server's edit memory: what IKE, ICE, SERAC and GRACE edits register.

- IKE/ICE and SERAC entries sit in two FAISS edit memories (`memory.index.EditMemory`), one per
  kind, so a flood of one kind never crowds the other out of the top-k. Before a chat request is
  tokenized, `retrieve` embeds its last user message (only that, only when some entry exists,
  and cached by text: `SentenceEncoder.encode_query`), retrieves entries whose similarity reaches
  their edit's threshold and conditions the conversation on their facts (`methods.ike.condition`).
- GRACE entries sit in one `memory.codebook.Codebook`, served by a forward hook on one layer's
  down-projection of the live model, and of the workbench (so every method computes on the
  model as served). The hook is attached, and entries change, only inside the engine's
  exclusive section, so no generation ever sees two codebooks.

`register`/`remove` run on the engine thread with no request in flight (the caller's
`run_exclusive`); `retrieve` runs on request threads. `generation` counts changes of the
prompt-side memory, so a request can tell whether the memory changed between rendering its
prompt and being admitted (then it renders again: see `OpenAIServing.chat`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from editserve.edits.methods import METHODS, memory_store
from memory.codebook import Codebook
from memory.encoder import DIM, EncoderUnavailable, SentenceEncoder
from memory.index import EditMemory, Hit
from memory.scope import CANDIDATES, ScopeClassifier
from methods.architectures import ResolvedArch
from methods.grace import label
from methods.ike import condition
from methods.memory_common import MemoryContext, MemoryPayload

# The methods whose entries the sentence encoder embeds (facts, and every chat query): without
# its model files they cannot run (GRACE keys are the model's own activations).
ENCODER_METHODS = tuple(m for m, s in METHODS.items() if s.memory_store in ("ike", "serac"))
TOP_K = 4  # IKE facts retrieved per request at most (SERAC uses its best one)
DRY_RUN_ID = "dry-run"  # the edit id of a previewed edit's entries


class MemoryEdits:
    def __init__(
        self,
        live: ResolvedArch,
        bench: ResolvedArch,
        encoder: SentenceEncoder | None = None,
        scope: ScopeClassifier | None = None,
    ) -> None:
        self.live, self.bench = live, bench
        self.encoder = encoder or SentenceEncoder()
        self.scope = scope  # SERAC's trained scope classifier; None: each entry's cosine threshold
        self.indexes = {"ike": EditMemory(DIM), "serac": EditMemory(DIM)}
        self.codebook = Codebook()
        self.codebook_layer: int | None = None
        self._hooks: list[RemovableHandle] = []
        self._bench_hook_on = True
        self._store_of: dict[str, str] = {}  # edit id -> store
        self._generation = 0
        self._lock = threading.Lock()

    # -- for methods -------------------------------------------------------------------------------

    def context(self) -> MemoryContext:
        return MemoryContext(
            encoder=self.encoder,
            codebook=self.codebook,
            codebook_layer=self.codebook_layer,
            bench_without_codebook=self._bench_without_codebook,
        )

    @contextmanager
    def _bench_without_codebook(self) -> Iterator[None]:
        self._bench_hook_on = False
        try:
            yield
        finally:
            self._bench_hook_on = True

    def unavailable(self) -> dict[str, str]:
        """The memory methods that cannot run on this install, each with why (a package or files
        to install): checked without loading anything."""
        why = self.encoder.unavailable()
        return dict.fromkeys(ENCODER_METHODS, why) if why else {}

    # -- changes (engine thread, exclusive) ------------------------------------------------------

    def register(self, edit_id: str, method: str, payload: MemoryPayload) -> None:
        store = memory_store(method)
        if method in ENCODER_METHODS and (why := self.encoder.unavailable()):
            # Registered, its entries could not be retrieved (no query embeds): a replay leaves
            # the edit out, and says why, rather than fail every chat request.
            raise EncoderUnavailable(why)
        if store == "codebook":
            self._register_grace(edit_id, payload)
        else:
            self.indexes[store].add(edit_id, payload.entries, payload.tensors["embeddings"])
            with self._lock:
                self._generation += 1
        self._store_of[edit_id] = store

    def _register_grace(self, edit_id: str, payload: MemoryPayload) -> None:
        layer = int(payload.entries[0]["layer"])
        if self.codebook_layer is None:
            self._attach(layer)
        elif layer != self.codebook_layer:
            raise ValueError(f"the codebook sits at layer {self.codebook_layer}, not {layer}")
        t = payload.tensors
        try:
            for i, entry in enumerate(payload.entries):
                key, value, radius = t["keys"][i], t["values"][i], float(t["radii"][i])
                self.codebook.add(edit_id, key, label(entry["target"]), value, radius)
        except Exception:  # all of the edit or none of it
            self.codebook.remove(edit_id)
            if not self.codebook.edit_ids():
                self._detach()
            raise

    def remove(self, edit_id: str) -> int:
        """Takes the edit's entries out; returns how many stores held any."""
        store = self._store_of.pop(edit_id, None)
        if store is None:
            return 0
        if store == "codebook":
            self.codebook.remove(edit_id)
            if not self.codebook.edit_ids():
                self._detach()  # empty: the hook goes, and a later edit may pick its layer
        else:
            self.indexes[store].remove(edit_id)
            with self._lock:
                self._generation += 1
        return 1

    def _attach(self, layer: int) -> None:
        serve = self.codebook.attach(self.live.down_proj(layer))

        def bench_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> Any:
            return self.codebook.serve(inputs[0], output) if self._bench_hook_on else None

        self._hooks = [serve, self.bench.down_proj(layer).register_forward_hook(bench_hook)]
        self.codebook_layer = layer

    def _detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self.codebook_layer = [], None

    # -- the chat path (request threads) ---------------------------------------------------------

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def has_prompt_entries(self) -> bool:
        return any(len(index) for index in self.indexes.values())

    def retrieve(
        self, messages: list[dict[str, str]], pending: tuple[str, MemoryPayload] | None = None
    ) -> list[dict[str, Any]]:
        """The entries relevant to the conversation's last user message: IKE/ICE entries
        (top-k) and SERAC's best one, each only if the query falls in its scope (`_reached`).
        `pending` (method, payload): an edit not registered, searched as if it were (dry runs)."""
        users = [m["content"] for m in messages if m["role"] == "user"]
        extra_store = memory_store(pending[0]) if pending else None
        if not users or not (self.has_prompt_entries() or extra_store in self.indexes):
            return []
        query = self.encoder.encode_query(users[-1])  # [1, 384]
        ike = self._reached("ike", query, TOP_K, pending)
        return ike + self._reached("serac", query, 1, pending)

    def _reached(
        self, store: str, query: torch.Tensor, k: int, pending: tuple[str, MemoryPayload] | None
    ) -> list[dict[str, Any]]:
        """At most k entries of `store` in whose scope the query falls, best first: those whose
        cosine reaches their edit's threshold, or for SERAC with a trained scope classifier,
        those of the `CANDIDATES` nearest whose probability reaches the classifier's."""
        judged = store == "serac" and self.scope is not None
        wanted = CANDIDATES if judged else k
        index = self.indexes[store]
        hits = index.search(query, wanted, vectors=judged)[0] if len(index) else []
        if pending and memory_store(pending[0]) == store:
            hits = sorted(hits + _search(query, pending[1], wanted), key=lambda h: -h.score)
            hits = hits[:wanted]
        if judged and hits:
            assert self.scope is not None
            vectors = torch.from_numpy(np.stack([h.vector for h in hits]))
            probabilities = self.scope.probability(query, vectors).tolist()
            hits = [replace(h, score=p) for h, p in zip(hits, probabilities, strict=True)]
            reached = [h for h in hits if h.score >= self.scope.threshold]
        else:
            reached = [h for h in hits if h.score >= h.entry["threshold"]]
        reached.sort(key=lambda h: -h.score)
        scope = "classifier" if judged else "cosine"
        return [
            {"edit_id": h.edit_id, "store": store, "score": h.score, "scope": scope, **h.entry}
            for h in reached[:k]
        ]

    @contextmanager
    def preview(
        self, method: str, payload: MemoryPayload
    ) -> Iterator[Callable[[list[dict[str, str]]], list[dict[str, Any]]]]:
        """The workbench as if the edit were registered, for the block; nothing live changes.

        Yields the `retrieve` to use (searching the edit's IKE/SERAC entries alongside the live
        ones); a GRACE edit is served on the workbench from a scratch copy of the live codebook
        with the edit folded in (the live hook is lifted meanwhile)."""
        if memory_store(method) != "codebook":
            yield lambda messages: self.retrieve(messages, (method, payload))
            return
        layer = int(payload.entries[0]["layer"])
        if self.codebook_layer is not None and layer != self.codebook_layer:
            raise ValueError(f"the codebook sits at layer {self.codebook_layer}, not {layer}")
        scratch = Codebook.from_tensors(self.codebook.to_tensors())
        t = payload.tensors
        for i, entry in enumerate(payload.entries):
            key, value, radius = t["keys"][i], t["values"][i], float(t["radii"][i])
            scratch.add(DRY_RUN_ID, key, label(entry["target"]), value, radius)
        with self._bench_without_codebook(), scratch.attached(self.bench.down_proj(layer)):
            yield self.retrieve

    @staticmethod
    def apply(
        messages: list[dict[str, str]], used: list[dict[str, Any]], demonstrations: bool = True
    ) -> list[dict[str, str]]:
        """The conversation conditioned on the retrieved entries: their facts (with IKE's
        demonstrations if an IKE entry asks for them and `demonstrations`) and their erasures."""
        if not used:
            return messages
        # Entries journaled before erases were told apart lack "erase": they stay fact lines.
        facts = list(dict.fromkeys(u["fact"] for u in used if not u.get("erase")))
        refusals = list(dict.fromkeys((u["prompt"], u["target"]) for u in used if u.get("erase")))
        demos = demonstrations and any(u.get("demonstrations") for u in used)
        return condition(messages, facts, demos, refusals)

    def render(
        self,
        messages: list[dict[str, str]],
        used: list[dict[str, Any]],
        template: Callable[[list[dict[str, str]]], list[int]],
        budget: int,
    ) -> tuple[list[int], list[dict[str, Any]]]:
        """The conditioned prompt's token ids (`template` renders a conversation) and the
        entries whose facts it holds, within `budget` tokens: edit facts must not push a request
        out of the context window, so without IKE's demonstrations first, then (rarely) without
        the facts."""
        if used:
            for demonstrations in (True, False):
                ids = template(self.apply(messages, used, demonstrations))
                if len(ids) <= budget:
                    return ids, used
        return template(messages), []


def _search(query: torch.Tensor, payload: MemoryPayload, k: int) -> list[Hit]:
    """The k entries of `payload` nearest to `query` ([1, 384]), as `EditMemory.search` would
    rank them were they registered."""
    embeddings = payload.tensors["embeddings"].float()  # [n, 384]
    scores = (embeddings @ query[0].float()).tolist()  # [n]
    best = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    return [
        Hit(DRY_RUN_ID, dict(payload.entries[i]), scores[i], embeddings[i].numpy()) for i in best
    ]


def describe(method: str, payload: MemoryPayload) -> dict:
    """What an edit adds to the memory, for its response."""
    store = memory_store(method)
    out: dict[str, Any] = {"store": store, "entries": len(payload.entries)}
    if store == "codebook":
        out["codebook"] = [
            {k: e[k] for k in ("decision", "steps", "nll", "converged") if k in e}
            for e in payload.entries
        ]
    return out
