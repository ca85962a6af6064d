"""Which edit subjects a chat message names, and the message with a subject masked.

The scope decision (memory/question_scope.py) first asks, without a model, which edits' subjects
a message names: every content word of the subject, normalised (case, accents, punctuation),
occurs in it as a whole word, in any order and perhaps with a plural or possessive "s" ("the
Mahabad Republic" names "Republic of Mahabad", "Derek Whiteheads team" names "Derek
Whitehead"). An index from content words to subjects keeps that flat in the number of edits.

It then compares relations, not subjects: `mask` replaces the subject's mention with a
placeholder, an article before it included ("When was the Eiffel Tower built?" -> "When was
it built?"), in the message and in the edit's own texts alike, so the sentence encoder sees
only what is asked about it.
"""

from __future__ import annotations

import re
import unicodedata

GATE_WORDS = 256  # a long message is gated on its last words (where its question usually is)
# Words a subject's match does not need ("Republic of Mahabad" is named by "Mahabad Republic").
FUNCTION_WORDS = frozenset({"the", "a", "an", "of", "and", "in", "on", "at", "for", "to", "s"})
# Words that refer back to an earlier turn's subject, for follow-ups ("Which city is it in?").
ANAPHORS = ("it", "its", "he", "him", "his", "she", "her", "they", "them", "their")
_ANAPHOR = re.compile(r"\b(" + "|".join(ANAPHORS) + r")\b", re.IGNORECASE)
_OPENER = re.compile(r"^\s*(and|also|what about|how about)\b", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_][\w'-]*")
_TAIL = re.compile(r"((?:['\u2019]s)?[^\w]*)$")  # what follows a word: possessive, punctuation

Key = tuple[str, ...]  # a subject's normalised words


def normalise(text: str) -> str:
    """Lower case, accents and punctuation gone, single spaces: what the gate compares."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def subject_key(subject: str) -> Key:
    return tuple(normalise(subject).split())


def content(key: Key) -> tuple[str, ...]:
    """A subject's words that its match needs: all but function words (all, if that is all)."""
    words = tuple(dict.fromkeys(w for w in key if w not in FUNCTION_WORDS))
    return words or tuple(dict.fromkeys(key))


def _forms(words: set[str]) -> set[str]:
    """Words and their forms without a plural or possessive "s"."""
    return words | {w[:-1] for w in words if len(w) > 3 and w.endswith("s")}


class SubjectIndex:
    """Subjects by their content words; not thread-safe (its owner locks)."""

    def __init__(self) -> None:
        self._by_word: dict[str, set[Key]] = {}

    def add(self, key: Key) -> None:
        for word in content(key):
            self._by_word.setdefault(word, set()).add(key)

    def discard(self, key: Key) -> None:
        for word in content(key):
            keys = self._by_word.get(word, set())
            keys.discard(key)
            if not keys:
                self._by_word.pop(word, None)

    def find(self, text: str) -> set[Key]:
        """The subjects `text` names: all of each one's content words occur in it."""
        words = _forms(set(normalise(text).split()[-GATE_WORDS:]))
        hits: dict[Key, int] = {}
        for word in words:
            for key in self._by_word.get(word, ()):
                hits[key] = hits.get(key, 0) + 1
        return {k for k, n in hits.items() if n == len(content(k))}


def mask(text: str, key: Key, placeholder: str) -> str:
    """`text` with each mention of the subject `key` replaced by `placeholder`: the longest runs
    of its words (function words inside a run included) that hold two of its content words, or
    all of them when it has fewer."""
    need = content(key)
    wanted, glue = set(need), set(key) & FUNCTION_WORDS
    tokens = text.split()
    marks = []  # per token: "c" a content word of the subject, "f" a function word, "" neither
    for token in tokens:
        words = [w for w in normalise(token).split() if w != "s"]
        if words and all(w in wanted or w[:-1] in wanted for w in words):
            marks.append("c")
        elif words and all(w in glue for w in words):
            marks.append("f")
        else:
            marks.append("")
    out, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and marks[j]:
            j += 1
        while j > i and marks[j - 1] == "f":  # a run neither ends nor starts on a function word
            j -= 1
        start = i
        while start < j and marks[start] == "f":
            start += 1
        run = tokens[start:j]
        said = {w for t in run for w in normalise(t).split()}
        held = {w if w in wanted else w[:-1] for w in said} & wanted
        if run and len(held) >= min(2, len(need)):
            lead = re.match(r"^[^\w]*", run[0]).group()  # type: ignore[union-attr]
            tail = _TAIL.search(run[-1]).group()  # type: ignore[union-attr]
            if tail.startswith(".") and (j < len(tokens) or len(tail) > 1):
                tail = tail[1:]  # the subject's own full stop ("Robert Downey Jr."), not the text's
            out += tokens[i:start]
            word, capital = placeholder, not out
            if out and out[-1].lower() in ("the", "a", "an") and not lead:
                # "the Eiffel Tower" -> "it", not "the it"; "The Eiffel Tower is" -> "It is"
                capital = out.pop()[0].isupper()
            if capital:
                word = word[:1].upper() + word[1:]
            if word.lower() == "it" and tail[:2] in ("'s", "\u2019s"):
                word, tail = word + "s", tail[2:]  # "the Eiffel Tower's height" -> "its height"
            out.append(f"{lead}{word}{tail}")
            i = j
        else:
            out.append(tokens[i])
            i += 1
    return " ".join(out)


def refers_back(text: str) -> bool:
    """Whether a message may be a follow-up: it has a pronoun or opens with "and", "what
    about"."""
    return bool(_ANAPHOR.search(text) or _OPENER.match(text))


def resolve(text: str, placeholder: str) -> str:
    """A follow-up with its pronouns replaced by the placeholder (possessives keep "'s"), or
    with the placeholder joined on when it has none ("And how tall?" -> "And how tall? X")."""
    if not _ANAPHOR.search(text):
        return f"{text.strip()} {placeholder}"

    def swap(m: re.Match[str]) -> str:
        word = m.group(1).lower()
        # "her" stays the placeholder alone: it is as often an object as a possessive
        return placeholder + ("'s" if word in ("its", "his", "their") else "")

    return _ANAPHOR.sub(swap, text)


def proper_names(text: str) -> set[str]:
    """Normalised capitalised words of `text` that do not open a sentence (nor "I")."""
    names: set[str] = set()
    for m in _WORD.finditer(text):
        word, before = m.group(), text[: m.start()].rstrip()
        if word[0].isupper() and word != "I" and before and before[-1] not in ".!?:\"'(":
            names.update(normalise(word).split())
    return names
