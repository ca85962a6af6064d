"""What memory methods (IKE, ICE, SERAC, GRACE) take and return.

A memory method, like a parameter method, computes and changes nothing. It returns a
`MemoryPayload`: JSON-able entries (the texts: fact, question, target, the thresholds that gate
them) and tensors (embeddings for the FAISS edit memory, or GRACE keys/values/radii). `editserve`
journals the entries in the edit's record and the tensors in its safetensors file, and registers
both with the live memory; replaying them on start restores the memory exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from memory.codebook import Codebook
from memory.encoder import SentenceEncoder


@dataclass
class MemoryPayload:
    """A memory edit's result: `entries[i]` is a JSON-able dict; tensors travel alongside."""

    entries: list[dict[str, Any]]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MemoryContext:
    """The live memory as a method may read it (never write it).

    `bench_without_codebook()` lifts the live codebook's hook from the workbench for a block, so
    GRACE can serve its own trial copy of the codebook there while it trains a value.
    """

    encoder: SentenceEncoder
    codebook: Codebook
    codebook_layer: int | None  # where the live codebook sits; None before the first GRACE edit
    bench_without_codebook: Callable[[], AbstractContextManager[None]]


def fact_text(prompt: str, target: str) -> str:
    """A fact as one line: the question and its new answer (QA-shaped: measured to steer the
    embedded chat model better than the bare "{prompt} {target}"; docs/memory-edits.md)."""
    return f"{prompt.strip()} Answer: {target.strip()}"
