"""What every editing method takes and returns.

A method computes; it never changes the model. It gets a *workbench*: module objects of its own
that share the live model's weight tensors (see `methods.workbench`), so it may register
hooks freely while the server keeps answering on the live modules. It returns a `ParamDelta`,
which only `editserve` applies, journals and undoes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from methods.architectures import ResolvedArch


@dataclass(frozen=True)
class EditRequest:
    """One fact: `prompt` asks about `subject` (verbatim in it); the new answer is `target_new`."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase: tuple[str, ...] = ()
    # An erase: `target_new` is the refusal to give instead of the fact. Weight edits train it
    # like any target; prompt memory shows it as an earlier exchange (methods.ike.condition).
    erase: bool = False


@dataclass
class ParamDelta:
    """Weight changes per parameter name (state-dict names), in float32.

    Low-rank: ΔW = U @ V with U [out, r], V [r, in] in the parameter's own layout; or dense: ΔW.
    `keys` [n, in] per parameter: the keys the edit wrote new values for. They change no weight;
    AlphaEdit protects the keys of every active edit, so they are journaled with the delta.
    """

    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted({*self.low_rank, *self.dense})

    def matrix(self, name: str) -> torch.Tensor:
        """The full ΔW of one parameter (float32)."""
        if name in self.dense:
            return self.dense[name]
        u, v = self.low_rank[name]
        return u @ v

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat dict for safetensors; `from_tensors` inverts it."""
        flat = {f"dense::{n}": t.contiguous() for n, t in self.dense.items()}
        for n, (u, v) in self.low_rank.items():
            flat[f"u::{n}"], flat[f"v::{n}"] = u.contiguous(), v.contiguous()
        flat.update({f"keys::{n}": k.contiguous() for n, k in self.keys.items()})
        return flat

    @classmethod
    def from_tensors(cls, flat: dict[str, torch.Tensor]) -> ParamDelta:
        delta = cls()
        for key, tensor in flat.items():
            kind, name = key.split("::", 1)
            if kind == "dense":
                delta.dense[name] = tensor
            elif kind == "u":
                delta.low_rank[name] = (tensor, flat[f"v::{name}"])
            elif kind == "keys":
                delta.keys[name] = tensor
        return delta


@dataclass
class EditContext:
    """What a method may use. `chat_prompt(question)` gives the token ids the server would feed
    before answering `question` in chat (template and assistant header included): targets must be
    optimised after it, the context users meet."""

    model: nn.Module  # a workbench: hook it freely, never write its weights
    tokenizer: PreTrainedTokenizerBase
    arch: ResolvedArch
    chat_prompt: Callable[[str], list[int]]
    device: torch.device = torch.device("cpu")
    model_fingerprint: str = ""  # for caches keyed by model (templates, statistics)
    # E[k kᵀ] of down_proj(l)'s inputs for each layer asked (methods.stats; cached by the caller)
    second_moments: Callable[[Sequence[int]], dict[int, torch.Tensor]] | None = None
    # torch.linalg.eigh (float64) of layer l's second moment, kept by the caller with the
    # statistics (AlphaEdit's projector); None: decomposed on each use
    moment_eigh: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
    # The keys [m, in] of the active edits at a parameter (empty [0, in] when none)
    edited_keys: Callable[[str], torch.Tensor] | None = None
    # The requests of the weight edits in the model now, oldest first
    edited_requests: Callable[[], list[EditRequest]] | None = None
