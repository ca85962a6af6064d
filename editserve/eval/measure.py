"""Observe one record through the API: what `metrics` needs, before or after an edit.

Per probe: the teacher-forced tokens of its first accepted answer after the raw prompt
(`prompt + " " + answer`, EasyEdit's default, no chat template) and the greedy chat answer,
sized to that answer: max(answer_tokens, its tokens + answer_margin), its tokens counted by the
server's own tokenizer (they are the teacher-forced call's), so a long target (WikiBio's
sentences) is not cut off before it could be said.
Per record: two texts for fluency (a sampled raw continuation of the edit prompt, as ROME and
KnowEdit generate, and the greedy chat answer, as users read it) and, for ConvSent, the mean
log-likelihood of each response of either sentiment. Observations are plain JSON, so a run
can store them and score them later (the unedited model's once, for every method).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

from editserve.eval.client import EvalClient
from editserve.eval.datasets import EvalRecord, Probe


@dataclass(frozen=True)
class MeasureSettings:
    answer_tokens: int = 24  # generated answer judged for success/portability: at least this
    # Tokens beyond the target's own that a judged answer may take; None: always answer_tokens
    # (the fixed 24-token answers of runs before answers were sized).
    answer_margin: int | None = 8
    locality_tokens: int = 16  # generated answer compared before/after for locality
    fluency_tokens: int = 100  # 0: no fluency texts
    top_p: float = 0.9  # raw fluency sample (the API has no top-k; ROME samples top-k 5)
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["answer_margin"] is None:  # as runs before the margin wrote it: they resume
            del out["answer_margin"]
        return out


def answer_budget(target_tokens: int, answer_tokens: int, margin: int | None) -> int:
    """max_tokens of a judged chat answer: room for the whole target and a few words more."""
    return answer_tokens if margin is None else max(answer_tokens, target_tokens + margin)


async def observe_probe(
    client: EvalClient, probe: Probe, answer_tokens: int, margin: int | None = None
) -> dict[str, Any]:
    target = " " + probe.answers[0].strip()
    if margin is None:
        scored, answer = await asyncio.gather(
            client.score_target(probe.prompt, target), client.answer(probe.prompt, answer_tokens)
        )
    else:
        # The teacher-forced call tokenizes the target with the server's tokenizer first.
        scored = await client.score_target(probe.prompt, target)
        answer_tokens = answer_budget(len(scored.tokens), answer_tokens, margin)
        answer = await client.answer(probe.prompt, answer_tokens)
    return {
        "prompt": probe.prompt,
        "tokens": scored.tokens,
        "top1": scored.top1,
        "answer": answer,
        "max_tokens": answer_tokens,
    }


async def _probes(
    client: EvalClient, probes: tuple[Probe, ...], tokens: int, margin: int | None = None
) -> list[dict]:
    return list(await asyncio.gather(*(observe_probe(client, p, tokens, margin) for p in probes)))


async def _groups(
    client: EvalClient,
    groups: dict[str, tuple[Probe, ...]],
    tokens: int,
    margin: int | None = None,
) -> dict:
    keys = list(groups)
    done = await asyncio.gather(*(_probes(client, groups[k], tokens, margin) for k in keys))
    return dict(zip(keys, done, strict=True))


async def _mean_logprob(client: EvalClient, prompt: str, text: str) -> float:
    lps = (await client.score_target(prompt, " " + text)).logprobs
    return sum(lps) / len(lps) if lps else 0.0


async def _fluency(client: EvalClient, prompt: str, s: MeasureSettings, index: int) -> dict:
    raw, chat = await asyncio.gather(
        client.complete(
            prompt,
            s.fluency_tokens,
            temperature=1.0,
            top_p=s.top_p,
            seed=s.seed + index,
            ignore_eos=True,  # ROME's sampler runs to its length; an instruct model stops at "?"
        ),
        client.answer(prompt, s.fluency_tokens),
    )
    return {"raw": raw, "chat": chat}


async def measure(client: EvalClient, record: EvalRecord, s: MeasureSettings) -> dict[str, Any]:
    prompt = record.reliability[0].prompt
    # Judged answers are sized to their targets; locality answers are compared word for word
    # before and after, so they keep one fixed length.
    m = s.answer_margin
    jobs: dict[str, Any] = {
        "reliability": _probes(client, record.reliability, s.answer_tokens, m),
        "generalization": _probes(client, record.generalization, s.answer_tokens, m),
        "portability": _groups(client, record.portability, s.answer_tokens, m),
        "locality": _groups(client, record.locality, s.locality_tokens),
    }
    if s.fluency_tokens:
        jobs["fluency"] = _fluency(client, prompt, s, record.index)
    if record.sentiment is not None:
        sent = record.sentiment

        async def sentiment() -> dict[str, list[float]]:
            target = asyncio.gather(*(_mean_logprob(client, prompt, t) for t in sent.target_texts))
            other = asyncio.gather(*(_mean_logprob(client, prompt, t) for t in sent.other_texts))
            t, o = await asyncio.gather(target, other)
            return {"target": list(t), "other": list(o)}

        jobs["sentiment"] = sentiment()
    values = await asyncio.gather(*jobs.values())
    return dict(zip(jobs, values, strict=True))
