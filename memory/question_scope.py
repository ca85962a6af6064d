"""The scope of a scoped edit: which chat requests an edit reaches, decided per request.

A scoped edit (docs: DESIGN.md, "Scoped edits") changes the answers to the questions in its
scope and nothing else. Each edit's scope is a `ScopeEntry`: its subject, positives (its prompt,
the rephrasings it was given, and question forms written from them by `memory.rewordings`) and
negatives (the same subject's other relations from `memory.question_bank`, the edit's locality
prompts, everyday questions). `QuestionScope.decide(conversation)` gives the edits in scope of a
conversation (its user messages, the last one last), newest first:

1. Subject gate (cheap, no model): the edit's subject, normalised (case, accents, punctuation),
   occurs in the last user message as whole words. A follow-up that names no subject ("Which
   city is it in?") takes the subjects of the nearest earlier user turn that has some, provided
   it refers back (a pronoun, or an opener like "and ...") and names no new proper name.
2. The query is embedded once: the last message, or for a follow-up the message with its
   pronouns replaced by the subject ("Which city is Eiffel Tower in?").
3. Rule per candidate edit: in scope iff max cos(query, positives) >= tau and that minus max
   cos(query, negatives) >= margin. The positives answer "is it this edit's question?", the
   margin "is it nearer this relation than the subject's others?".

tau and margin default to the calibration in `question_scope_defaults.json` (written by
bench/calibrate_scope.py on the tuning split); an entry may carry its own. The gate keeps the
cost flat in the number of edits: only edits whose subject the message names are scored, each
against its own small matrix (float16, since cosines need no more).

An entry is plain JSON (`to_json`/`from_json`). Its embeddings are a function of its texts:
`QuestionScope.add` embeds them in one `encode` call of a fixed order, so a replay that adds the
same entries to a scope with the same encoder rebuilds the same vectors and decisions.
"""

from __future__ import annotations

import json
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import numpy as np

from memory.question_bank import UNRELATED, subject_negatives
from memory.rewordings import rewordings

DEFAULTS_FILE = "question_scope_defaults.json"
FOLLOW_UP_TURNS = 3  # earlier user turns a follow-up may refer back to
GATE_WORDS = 256  # a long message is gated on its last words (where its question usually is)
ANAPHORS = {"it": "", "he": "", "she": "", "they": "", "him": "", "them": "", "its": "'s",
            "his": "'s", "their": "'s", "her": "'s"}  # fmt: skip
_ANAPHOR = re.compile(r"\b(" + "|".join(ANAPHORS) + r")\b", re.IGNORECASE)
_OPENER = re.compile(r"^\s*(and|also|what about|how about)\b", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_][\w'-]*")


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> Any: ...  # [n, d], unit rows (torch or numpy)

    def encode_query(self, text: str) -> Any: ...  # [1, d]


def normalise(text: str) -> str:
    """Lower case, accents and punctuation gone, single spaces: what the subject gate compares."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def default_settings() -> dict[str, float]:
    """tau and margin from the committed calibration (bench/calibrate_scope.py writes it)."""
    data = json.loads(resources.files("memory").joinpath(DEFAULTS_FILE).read_text())
    return {"tau": float(data["tau"]), "margin": float(data["margin"])}


def _check_settings(tau: float | None, margin: float | None) -> None:
    if tau is not None and not 0.0 <= tau <= 1.0:
        raise ValueError(f"scope tau is a cosine in [0, 1], not {tau}")
    if margin is not None and not -1.0 <= margin <= 1.0:
        raise ValueError(f"scope margin is a cosine difference in [-1, 1], not {margin}")


def _unique(texts: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(" ".join(t.split()) for t in texts if t and t.strip()))


@dataclass(frozen=True)
class ScopeEntry:
    """One scoped edit's scope: what `QuestionScope` needs, as plain data."""

    edit_id: str
    subject: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    tau: float | None = None  # None: the scope's setting
    margin: float | None = None

    def __post_init__(self) -> None:
        if not self.edit_id:
            raise ValueError("a scope entry needs an edit id")
        if not normalise(self.subject):
            raise ValueError(f"the subject {self.subject!r} has no words to match a message on")
        if not self.positives:
            raise ValueError("a scope entry needs at least one positive (the edit's prompt)")
        _check_settings(self.tau, self.margin)

    def to_json(self) -> dict[str, Any]:
        return {
            "edit_id": self.edit_id,
            "subject": self.subject,
            "positives": list(self.positives),
            "negatives": list(self.negatives),
            "tau": self.tau,
            "margin": self.margin,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScopeEntry:
        try:
            return cls(
                edit_id=str(data["edit_id"]),
                subject=str(data["subject"]),
                positives=tuple(str(t) for t in data["positives"]),
                negatives=tuple(str(t) for t in data.get("negatives", ())),
                tau=None if data.get("tau") is None else float(data["tau"]),
                margin=None if data.get("margin") is None else float(data["margin"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a scope entry ({exc!r}): {str(data)[:200]}") from exc


def build_entry(
    edit_id: str,
    prompt: str,
    subject: str,
    rephrase: Sequence[str] = (),
    locality: Sequence[str] = (),
    *,
    tau: float | None = None,
    margin: float | None = None,
) -> ScopeEntry:
    """The scope of an edit of `prompt` about `subject`: positives are the prompt, its
    rephrasings and the question forms written from both; negatives the bank's other relations
    of the subject, the locality prompts given and everyday questions (never a positive)."""
    if subject not in prompt:
        raise ValueError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    asked = [prompt, *rephrase]
    written = [form for text in asked for form in rewordings(text, subject)]
    positives = _unique([*asked, *written])
    candidates = _unique([*subject_negatives(asked, subject), *locality, *UNRELATED])
    negatives = tuple(t for t in candidates if t not in positives)
    return ScopeEntry(edit_id, subject, positives, negatives, tau, margin)


@dataclass(frozen=True)
class ScopeScore:
    """One gated edit's scores for a conversation."""

    edit_id: str
    positive: float  # max cos to its positives
    negative: float  # max cos to its negatives (-1 with none)
    in_scope: bool
    query: str  # the text embedded
    follow_up: bool


@dataclass
class _Compiled:
    entry: ScopeEntry
    seq: int  # order of addition: newest first in decisions
    key: tuple[str, ...]  # normalised subject words
    positives: np.ndarray  # [p, d] float16
    negatives: np.ndarray  # [n, d] float16: the negatives that name the subject
    shared: tuple[str, ...]  # its negatives without the subject, whose rows are kept once


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


class QuestionScope:
    """The scoped edits' entries and the per-request decision; thread-safe."""

    def __init__(
        self, encoder: Encoder, tau: float | None = None, margin: float | None = None
    ) -> None:
        defaults = default_settings() if tau is None or margin is None else {}
        self.tau = defaults["tau"] if tau is None else tau
        self.margin = defaults["margin"] if margin is None else margin
        _check_settings(self.tau, self.margin)
        self.encoder = encoder
        self._lock = threading.Lock()
        self._entries: dict[str, _Compiled] = {}
        self._by_key: dict[tuple[str, ...], dict[str, _Compiled]] = {}
        self._lengths_by_first: dict[str, set[int]] = {}  # first subject word -> subject lengths
        self._shared: dict[str, list[Any]] = {}  # text -> [float16 vector, entries using it]
        self._seq = 0

    # --- the entries ---------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, edit_id: object) -> bool:
        with self._lock:
            return edit_id in self._entries

    def entries(self) -> list[ScopeEntry]:
        """Every entry, in order of addition."""
        with self._lock:
            return [c.entry for c in sorted(self._entries.values(), key=lambda c: c.seq)]

    def embed(self, entry: ScopeEntry) -> np.ndarray:
        """[positives + the negatives that name the subject, d] unit rows, from one `encode`
        call in the entry's own order (so the same entry always gets the same rows)."""
        own, _ = _split(entry)
        return _as_numpy(self.encoder.encode([*entry.positives, *own]))

    def add(self, entry: ScopeEntry, vectors: np.ndarray | None = None) -> None:
        """Adds a scoped edit; `vectors` (from `embed`) skips embedding it again."""
        vectors = self.embed(entry) if vectors is None else _as_numpy(vectors)
        own, shared = _split(entry)
        p = len(entry.positives)
        if len(vectors) != p + len(own):
            raise ValueError(f"{len(vectors)} vectors for the texts of {entry.edit_id}")
        # Negatives without the subject (everyday questions) are the same for many edits: one
        # row each, embedded alone, so a row never depends on which entry brought it.
        missing = [t for t in shared if t not in self._shared]
        fresh = {t: _as_numpy(self.encoder.encode([t]))[0].astype(np.float16) for t in missing}
        key = tuple(normalise(entry.subject).split())
        half = vectors.astype(np.float16)
        compiled = _Compiled(entry, 0, key, half[:p], half[p:], shared)
        with self._lock:
            if entry.edit_id in self._entries:
                raise ValueError(f"{entry.edit_id} already has a scope entry")
            self._seq += 1
            compiled.seq = self._seq
            self._entries[entry.edit_id] = compiled
            self._by_key.setdefault(key, {})[entry.edit_id] = compiled
            self._lengths_by_first.setdefault(key[0], set()).add(len(key))
            for text in shared:
                row = self._shared.setdefault(text, [fresh.get(text), 0])
                if row[0] is None:  # added meanwhile by another writer and removed again
                    row[0] = _as_numpy(self.encoder.encode([text]))[0].astype(np.float16)
                row[1] += 1

    def remove(self, edit_id: str) -> bool:
        """Removes an edit's entry; False if it had none."""
        with self._lock:
            compiled = self._entries.pop(edit_id, None)
            if compiled is None:
                return False
            same = self._by_key[compiled.key]
            del same[edit_id]
            if not same:
                del self._by_key[compiled.key]
                lengths = {len(k) for k in self._by_key if k[0] == compiled.key[0]}
                if lengths:
                    self._lengths_by_first[compiled.key[0]] = lengths
                else:
                    del self._lengths_by_first[compiled.key[0]]
            for text in compiled.shared:
                row = self._shared[text]
                row[1] -= 1
                if row[1] == 0:
                    del self._shared[text]
            return True

    # --- the decision --------------------------------------------------------------------

    def decide(self, conversation: Sequence[str]) -> list[str]:
        """The edits in scope of a conversation (user messages, the last one last), newest
        first."""
        return [s.edit_id for s in self.scores(conversation) if s.in_scope]

    def scores(self, conversation: Sequence[str]) -> list[ScopeScore]:
        """Every edit the subject gate lets through, newest first, with its scores."""
        if not conversation:
            return []
        last = conversation[-1]
        with self._lock:
            if not self._entries:
                return []
            groups = self._gate(last)
            follow_up = False
            if not groups:
                groups = self._follow_up(conversation)
                follow_up = True
            # (query text, an entry scored on it, the rows of its shared negatives)
            work = [
                (self._query(last, key, follow_up), c, self._shared_rows(c))
                for key, edits in groups.items()
                for c in edits.values()
            ]
        work.sort(key=lambda w: -w[1].seq)  # newest first
        queries: dict[str, np.ndarray] = {}  # each distinct query text embedded once
        out: list[ScopeScore] = []
        for text, c, rows in work:
            if text not in queries:
                queries[text] = _as_numpy(self._encode_query(text))[0]  # [d]
            q = queries[text]
            pos = float((c.positives @ q).max())  # float16 rows promote to float32
            negs = [float((m @ q).max()) for m in (c.negatives, rows) if len(m)]
            neg = max(negs, default=-1.0)
            tau = self.tau if c.entry.tau is None else c.entry.tau
            margin = self.margin if c.entry.margin is None else c.entry.margin
            hit = pos >= tau and pos - neg >= margin
            out.append(ScopeScore(c.entry.edit_id, pos, neg, hit, text, follow_up))
        return out

    def _encode_query(self, text: str) -> Any:
        encode_query = getattr(self.encoder, "encode_query", None)
        return encode_query(text) if encode_query else self.encoder.encode([text])

    def _gate(self, text: str) -> dict[tuple[str, ...], dict[str, _Compiled]]:
        """The subjects (as normalised word tuples) that `text` names, with their entries."""
        words = normalise(text).split()[-GATE_WORDS:]
        found: dict[tuple[str, ...], dict[str, _Compiled]] = {}
        for i, word in enumerate(words):
            for n in self._lengths_by_first.get(word, ()):
                key = tuple(words[i : i + n])
                if key in self._by_key:
                    found[key] = self._by_key[key]
        return found

    def _follow_up(
        self, conversation: Sequence[str]
    ) -> dict[tuple[str, ...], dict[str, _Compiled]]:
        """For a last message that names no subject: the nearest earlier turn's subjects, if
        the message refers back and names no proper name the earlier turn lacks."""
        last = conversation[-1]
        if not (_ANAPHOR.search(last) or _OPENER.match(last)):
            return {}
        for earlier in list(conversation[-1 - FOLLOW_UP_TURNS : -1])[::-1]:
            if groups := self._gate(earlier):
                new_names = _proper_names(last) - set(normalise(earlier).split())
                return {} if new_names else groups
        return {}

    def _query(self, last: str, key: tuple[str, ...], follow_up: bool) -> str:
        if not follow_up:
            return last
        subject = next(iter(self._by_key[key].values())).entry.subject
        if not _ANAPHOR.search(last):  # "and how tall?": the subject joined on
            return f"{last.strip()} ({subject})"
        return _ANAPHOR.sub(lambda m: subject + ANAPHORS[m.group(1).lower()], last)

    def _shared_rows(self, c: _Compiled) -> np.ndarray:
        vecs = [self._shared[t][0] for t in c.shared]
        return np.stack(vecs) if vecs else np.zeros((0, c.positives.shape[1]), np.float16)

    # --- persistence ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The settings and every entry, in order of addition (`from_json` restores it)."""
        return {
            "tau": self.tau,
            "margin": self.margin,
            "entries": [e.to_json() for e in self.entries()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], encoder: Encoder) -> QuestionScope:
        scope = cls(encoder, float(data["tau"]), float(data["margin"]))
        for item in data.get("entries", ()):
            scope.add(ScopeEntry.from_json(item))
        return scope


def _split(entry: ScopeEntry) -> tuple[list[str], tuple[str, ...]]:
    """(the negatives that name the entry's subject, those that do not)."""
    subject = f" {normalise(entry.subject)} "
    own = [t for t in entry.negatives if subject in f" {normalise(t)} "]
    return own, tuple(t for t in entry.negatives if subject not in f" {normalise(t)} ")


def _proper_names(text: str) -> set[str]:
    """Normalised capitalised words of `text` that do not open a sentence (nor "I")."""
    names = set()
    for m in _WORD.finditer(text):
        word, before = m.group(), text[: m.start()].rstrip()
        if word[0].isupper() and word != "I" and before and before[-1] not in ".!?:\"'(":
            names.update(normalise(word).split())
    return names
