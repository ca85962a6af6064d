"""What counts as an answer naming a target: one definition for the server and the evaluation.

The edit response's `checks.success` and every success figure of `editserve eval` and the
benchmarks use `contains_answer`, so an edit the server reports as successful is one the
evaluation would score as such. A leaf module (standard library only): the serving core imports
it without pulling in the evaluation.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    """SQuAD-style: lower case, punctuation to spaces, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def contains_answer(answer: str, accepted: Iterable[str]) -> bool:
    """Whether the generated answer contains any accepted answer as whole words (normalised).

    KnowEdit's LLM-judge fallback is exact match on the first sentence; a chat model answers in
    sentences ("The capital of France is Paris."), so containment is what a reader would accept.
    """
    padded = f" {normalize(answer)} "
    return any(f" {n} " in padded for n in (normalize(a) for a in accepted) if n)
