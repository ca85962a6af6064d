"""Pure metric functions, matching KnowEdit/EasyEdit semantics unless a docstring says otherwise.

Teacher-forced token accuracy: the fraction of target tokens that are the model's argmax given
everything before them. Locality: agreement of the edited model with the unedited model (argmax
tokens, or whole generated answers), not with a ground truth. Fluency: ROME's `n_gram_entropy`,
(2/3 H2 + 4/3 H3) / 2 over word bigrams and trigrams, base 2. ConvSent: SERAC's sentiment edit
success, and VADER's reading of the chat answer's sentiment. Generated answers: normalised
containment of any accepted answer.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

# One definition of a generated answer's success, shared with the server's edit checks;
# scoring and the benchmarks import it from here.
from editserve.answers import contains_answer, normalize  # noqa: F401

BARE_WORDS = 3  # an answer of at most this many words (normalised) states nothing but the answer


def bare_answer(answer: str, accepted: Iterable[str]) -> bool:
    """Whether a chat answer that contains an accepted answer is only that answer: at most
    BARE_WORDS words after normalisation, or no more words than the (longer) answer it holds.
    GRACE's "Noctuidae" is; "Epaspidoceras belongs to the family Noctuidae." is not."""
    words = len(normalize(answer).split())
    held = [
        len(n.split()) for a in accepted if (n := normalize(a)) and contains_answer(answer, [a])
    ]
    return bool(held) and words <= max(BARE_WORDS, *held)


def token_accuracy(hits: Sequence[bool]) -> float:
    """Teacher-forced accuracy: the share of target tokens that were the argmax (0 if none)."""
    return sum(hits) / len(hits) if hits else 0.0


def agreement(before: Sequence[str], after: Sequence[str]) -> float:
    """Position-wise agreement of two argmax token sequences (EasyEdit's locality)."""
    if not before:
        return 1.0 if not after else 0.0
    same = sum(a == b for a, b in zip(before, after, strict=False))
    return same / max(len(before), len(after))


def mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def grouped_mean(groups: dict[str, Sequence[float]]) -> float | None:
    """KnowEdit's aggregation of portability/locality for one record: the mean over groups
    (Reasoning, Subject_Aliasing, ...) of each group's mean."""
    return mean(mean(values) for values in groups.values() if values)


# -- fluency --------------------------------------------------------------------------------------

# An approximation of NLTK's Treebank word tokenizer (NLTK is not a dependency): numbers with
# their separators, "n't" split from its verb, clitics ('s, 're) apart, punctuation alone.
_WORDS = re.compile(r"\d+(?:[.,]\d+)*|\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    return _WORDS.findall(text)


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's fluency: the arithmetic mean of weight_n · H_n, H_n the base-2 entropy of the
    text's word n-gram frequencies. A text too short for any n-gram scores 0 (ROME: nan)."""
    words = word_tokenize(text)
    terms = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(weight * h)
    return sum(terms) / len(terms)


# -- ConvSent -------------------------------------------------------------------------------------


def sentiment_edit_success(target_post: float, other_post: float, target_pre: float) -> float:
    """SERAC's ConvSent edit success, used by KnowEdit: sigmoid(target − other) · min(1, e^(post −
    pre)), from mean per-token log-likelihoods of responses with the target sentiment and with
    the other one, after the edit, and of the target responses before it. High when the edited
    model prefers the target sentiment and still finds such responses about the topic likely."""
    z_sent = 1 / (1 + math.exp(-(target_post - other_post)))
    z_topic = min(1.0, math.exp(target_post - target_pre))
    return z_sent * z_topic


@cache
def _vader() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()  # reads its lexicon file once


def judged_sentiment(text: str) -> str:
    """'positive', 'negative' or 'neutral': VADER's compound score with its authors' cut-offs
    (±0.05). A rule-based judge that ships with its lexicon, since no sentiment model can be
    downloaded; neutral answers count for neither side (docs/eval.md gives its agreement with
    ConvSent's labels)."""
    compound = _vader().polarity_scores(text)["compound"]
    if compound >= 0.05:
        return "positive"
    return "negative" if compound <= -0.05 else "neutral"
