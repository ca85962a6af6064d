"""Per-request sampling parameters and the choice of the next token."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token (completions echo)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        assert self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"
        assert self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"
        assert 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sampler:
    """Draws tokens for one request; its own generator makes a seeded request reproducible."""

    params: SamplingParams
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        """logits: [vocab] for this request's next position."""
        if self.params.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            probs = _top_p_filter(probs, self.params.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of tokens whose mass reaches top_p (always at least one)."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top_k: int) -> list[TokenLogprob]:
    """logits: [T, vocab]; chosen: [T] token ids. The model's own distribution (no temperature)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, chosen[:, None])[:, 0]
    if top_k > 0:
        top_values, top_ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    result = []
    for i in range(chosen.shape[0]):
        top = (
            tuple(zip(top_ids[i].tolist(), top_values[i].tolist(), strict=True))
            if top_k > 0
            else ()
        )
        result.append(TokenLogprob(int(chosen[i]), float(picked[i]), top))
    return result
