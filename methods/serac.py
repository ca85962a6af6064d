"""SERAC: a scope classifier over an edit memory, and a counterfactual path for in-scope queries.

Mitchell, Lin, Bosselut, Manning, Finn. "Memory-Based Model Editing at Scale", ICML 2022.

- Edit memory: one entry per request, the edit's question embedded with the sentence encoder.
- Scope classifier: by default, cosine similarity of the user's last message to an entry's
  question, against the edit's calibrated threshold (docs/memory-edits.md says how it was
  calibrated): the paper's bi-encoder classifier without training, all-MiniLM-L6-v2 as is. A
  server may instead load a trained classifier (`serac_scope`, trained by `editserve
  train-scope` on edit datasets: memory/scope.py); it then judges the nearest entries, and the
  edit's cosine threshold no longer applies.
- In scope (the best entry reaches its threshold), the counterfactual model answers: the base
  model conditioned on that one edit (the fact put before the question, as ICE does; the paper
  trains a small separate model for this, which a 135M base model makes moot). Out of scope, the
  base model answers the request unchanged: SERAC's hard switch, not EasyEdit's soft mixture.

The edit's rephrases are not stored as scope examples: they are what the edit is checked on, and
scope should generalise to paraphrases nobody wrote down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from methods.base import EditContext, EditRequest
from methods.hparams import HparamCheck, load_hparams
from methods.memory_common import MemoryContext, MemoryPayload, fact_text
from methods.spec import ALL_KINDS, MethodSpec


@dataclass(frozen=True)
class SeracHyperParams:
    threshold: float = 0.8  # cosine similarity to the edit's question that counts as in scope


def load_serac_hparams(model_type: str, num_layers: int, overrides: dict | None = None) -> Any:
    h = load_hparams(SeracHyperParams, "serac", model_type, num_layers, overrides)
    HparamCheck(h).cosine_threshold("threshold").done()
    return h


def compute_serac(
    ctx: EditContext, memory: MemoryContext, requests: list[EditRequest], h: SeracHyperParams
) -> MemoryPayload:
    embeddings = memory.encoder.encode([r.prompt for r in requests])  # [n, 384]
    entries = [
        {
            "fact": fact_text(r.prompt, r.target_new),
            "prompt": r.prompt,
            "target": r.target_new,
            "threshold": h.threshold,
            "erase": r.erase,
        }
        for r in requests
    ]
    return MemoryPayload(entries=entries, tensors={"embeddings": embeddings})


SPEC = MethodSpec(
    name="serac",
    kinds=ALL_KINDS,
    max_requests=64,
    load_hparams=load_serac_hparams,
    compute=compute_serac,
    description=(
        "scope classifier over an edit memory; in scope, the model conditioned on the edit answers"
    ),
    payload="memory",
    drains=False,
    memory_store="serac",
)
