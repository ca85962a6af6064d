"""Fluent targets for scoped edits: the answer the model gives, with the new object put where it
named the old one ("The Eiffel Tower is located in Paris, France." -> "The Eiffel Tower is
located in Rome.").

A scoped edit's delta reaches only the questions in its scope, so it can be trained on all of
them (the prompt, its rephrasings, the question forms `memory.rewordings` writes) and on a whole
sentence rather than a bare word: the chat answer then states the new fact the way the model
states facts. Where the unedited answer names no old object we can find (the model does not
know, or answers in another shape), a statement prompt gives the sentence itself ("The Eiffel
Tower is located in the city of" -> "... of Rome."); a question keeps the bare target.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from memory.rewordings import rewordings
from methods.base import EditContext, EditRequest

ANSWER_TOKENS = 32  # enough of an answer to reach the object in one or two sentences
MAX_QUESTIONS = 8  # the prompt, its rephrasings, then rewordings, at most
_WORD = re.compile(r"[A-Za-z0-9][\w'’.-]*")
_SENTENCE_START = re.compile(r"(^|[.!?:]\s+)$")


def scope_questions(request: EditRequest) -> list[str]:
    """The questions an edit's scope is trained on: its prompt, rephrasings, rewordings."""
    out: list[str] = []
    for text in (request.prompt, *request.rephrase, *rewordings(request.prompt, request.subject)):
        if request.subject in text and text not in out:
            out.append(text)
    return out[:MAX_QUESTIONS]


def unedited_answers(ctx: EditContext, questions: Sequence[str]) -> list[str]:
    """Greedy chat answers of the model as it is now (no trial change), batched."""
    prompts = [ctx.chat_prompt(q) for q in questions]
    pad = ctx.tokenizer.pad_token_id
    pad = ctx.tokenizer.eos_token_id if pad is None else pad
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=ctx.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=ctx.device)
    with torch.no_grad():
        out = ctx.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=ANSWER_TOKENS,
            do_sample=False,
            pad_token_id=pad,
        )
    return [
        ctx.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out.tolist()
    ]


def old_object_at(answer: str, question: str, subject: str, target_true: str | None) -> int | None:
    """Where `answer` names the old object: `target_true` if given and there; else the first
    name or number that is neither in the question nor the subject nor a sentence's first word."""
    if target_true and (at := answer.lower().find(target_true.strip().lower())) > 0:
        return at
    known = {w.lower().strip(".") for w in _WORD.findall(f"{question} {subject}")}
    for m in _WORD.finditer(answer):
        word = m.group().strip(".")
        named = word[0].isupper() or word[0].isdigit()
        if named and word.lower() not in known and not _SENTENCE_START.search(answer[: m.start()]):
            return m.start()
    return None


def fluent_target(answer: str, question: str, request: EditRequest) -> str:
    """The sentence to train for `question`: the answer up to its old object, then the new
    target; or, without an old object, the statement prompt completed, or the bare target."""
    target = request.target_new.strip()
    if not request.erase:
        at = old_object_at(answer, question, request.subject, request.target_true)
        prefix = _without_article(answer[:at]) if at is not None else ""
        if prefix and target.lower() not in prefix.lower():
            return f"{prefix} {target}{_full_stop(target)}"
        if not question.rstrip().endswith("?"):
            return f"{question.strip()} {target}{_full_stop(target)}"
    return target


def _without_article(prefix: str) -> str:
    """ "located in the" -> "located in": the old object's article is not the new one's."""
    words = prefix.split()
    while words and words[-1].lower() in ("the", "a", "an"):
        words.pop()
    return " ".join(words)


def _full_stop(target: str) -> str:
    return "" if target[-1] in ".!?" else "."
