"""An edit's checks: the greedy chat answers to its prompts and to unrelated probes, before and
after, and the report that compares them. Answers come through the engine (the path users hit),
or for a dry run from the workbench as if the edit were applied."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from editserve.answers import contains_answer
from editserve.edits.memory_edits import MemoryEdits
from editserve.edits.scoped import ScopedEdits
from editserve.edits.validation import EditSpec
from editserve.engine.request import OutputStream
from editserve.engine.sampling import SamplingParams
from editserve.engine.transformers_engine import TransformersEngine
from editserve.prompts import PromptRenderer, Retrieve
from editserve.threads import in_worker
from methods.base import ParamDelta
from methods.memory_common import MemoryPayload
from methods.workbench import added_delta

DEFAULT_PROBES = (
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
)
CHECK_TOKENS = 24  # answers compared in checks
UNCHANGED_TOKENS = 16  # a probe is unchanged when its first 16 greedy tokens are


class EditChecks:
    def __init__(
        self,
        engine: TransformersEngine,
        prompts: PromptRenderer,
        workbench: torch.nn.Module,
        memory: MemoryEdits,
        scoped: ScopedEdits,
    ) -> None:
        self.engine, self.prompts, self.workbench, self.memory = engine, prompts, workbench, memory
        self.scoped = scoped

    def served_prompt(self, question: str, retrieve: Retrieve | None = None) -> list[int]:
        """The prompt the chat route would feed for `question` (answered in CHECK_TOKENS):
        memory edits included, retrieved by `retrieve` (default: the live memory's)."""
        return self.prompts.served_question(question, CHECK_TOKENS, retrieve)

    async def answers(self, questions: list[str]) -> list[list[int]]:
        """Greedy chat answers through the engine: the path users hit, scoped edits decided
        per question as the chat route decides them."""
        stream = OutputStream()
        params = SamplingParams(max_tokens=CHECK_TOKENS, temperature=0)

        def render() -> list[tuple[list[int], tuple]]:
            return [(self.served_prompt(q), self.scoped.decide([q])[1]) for q in questions]

        for prompt, row_deltas in await in_worker(render):
            self.engine.submit(prompt, params, stream, row_deltas=row_deltas)
        return [r.token_ids for r in await stream.results()]

    def previewed_answers(
        self,
        questions: list[str],
        result: ParamDelta | MemoryPayload,
        method: str,
        in_scope: Callable[[str], bool] | None = None,
    ) -> list[list[int]]:
        """Greedy chat answers as if the edit were applied, without applying it (dry runs): on
        the workbench, with a weight delta added (a scoped one only for the questions
        `in_scope`), or with a memory edit previewed."""
        if isinstance(result, MemoryPayload):
            with self.memory.preview(method, result) as retrieve:
                return [self._greedy(self.served_prompt(q, retrieve)) for q in questions]
        out = []
        for question in questions:
            with ExitStack() as stack:
                if in_scope is None or in_scope(question):
                    stack.enter_context(added_delta(self.workbench, result))
                out.append(self._greedy(self.prompts.question_prompt(question)))
        return out

    def _greedy(self, prompt: list[int]) -> list[int]:
        eos = sorted(self.engine.eos_ids)
        ids = torch.tensor([prompt], device=self.engine.device)
        with torch.inference_mode():
            generated = self.workbench.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=CHECK_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )[0, ids.shape[1] :].tolist()
        return [t for t in generated if t not in eos][: len(generated)]


def check_report(
    edit: EditSpec,
    questions: list[str],
    probes: list[str],
    before: list[list[int]],
    after: list[list[int]],
    tokenizer: Any,
) -> dict:
    text = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in before]
    new = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in after]
    targets = {q: r.target_new for r in edit.requests for q in (r.prompt, *r.rephrase)}
    n = len(questions)
    return {
        "requests": [
            {
                "prompt": q,
                "target_new": targets[q],
                "before": text[i],
                "after": new[i],
                # as the evaluation scores it: whole words, normalised ("Romeo" is no "Rome")
                "success": contains_answer(new[i], [targets[q]]),
            }
            for i, q in enumerate(questions)
        ],
        "locality": [
            {
                "prompt": p,
                "before": text[n + j],
                "after": new[n + j],
                "unchanged": before[n + j][:UNCHANGED_TOKENS] == after[n + j][:UNCHANGED_TOKENS],
            }
            for j, p in enumerate(probes)
        ],
    }


def describe_delta(delta: ParamDelta) -> dict:
    """Each changed matrix's shape, rank (low-rank factors) and norm, for the edit's response."""
    described = {}
    for name in delta.names():
        matrix = delta.matrix(name)  # a product for low-rank factors: formed once
        described[name] = {
            "shape": list(matrix.shape),
            "rank": delta.low_rank[name][0].shape[1] if name in delta.low_rank else None,
            "norm": float(matrix.norm()),
        }
    return described
