"""The scope of a scoped edit: which chat requests an edit reaches, decided per request.

A scoped edit (DESIGN.md, "Scoped edits") changes the answers to the questions in its scope and
nothing else. Each edit's scope is a `ScopeEntry`: its subject, positives (its prompt, the
rephrasings it was given, and question forms written from them by `memory.rewordings`) and
negatives (the same subject's other relations from `memory.question_bank`, the edit's locality
prompts, everyday questions). `QuestionScope.decide(conversation)` gives the edits in scope of a
conversation (its user messages, the last one last), newest first:

1. Subject gate (no model, `memory.subject_gate`): the edits whose subject the last message
   names. A follow-up that names none ("Which city is it in?") takes the subjects of the nearest
   earlier user turn that names some, if it refers back (a pronoun, or "and ...", "what about
   ...") and names no proper name that turn lacks.
2. The query is embedded once per subject it names (nearly always once): the last message with
   the subject masked ("Which city is the X in?"; a follow-up's pronouns become the mask). The
   edit's own texts are masked alike, so the encoder compares what is asked, not the subject
   (the gate has settled that), and a negative such as "When was X built?" is the same text, and
   one row, for every edit that has it.
3. Rule per candidate edit: in scope iff max cos(query, positives) >= tau and that minus max
   cos(query, negatives) >= margin: near the edit's question, and nearer to it than to the
   subject's other questions; and it does not ask for another kind of answer than the edit's
   questions do (`memory.answer_type`: "When was X painted?" is not "Who painted X?").

tau, margin and the mask default to the calibration in `question_scope_defaults.json` (written
by bench/calibrate_scope.py on the tuning split); an entry may carry its own tau and margin.
Cost: the gate is a few dictionary look-ups per word, then one query embedding and a product
with the candidates' rows, whatever the number of edits.

An entry is plain JSON (`to_json`/`from_json`). Each text's embedding is a function of the text
alone (embedded on its own, not in a batch whose padding could move it), so a replay that adds
the same entries with the same encoder rebuilds the same vectors and decisions.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import numpy as np

from memory.answer_type import answer_type, conflicts
from memory.question_bank import UNRELATED, subject_negatives
from memory.rewordings import rewordings
from memory.subject_gate import (
    Key,
    SubjectIndex,
    mask,
    normalise,
    proper_names,
    refers_back,
    resolve,
    subject_key,
)

DEFAULTS_FILE = "question_scope_defaults.json"
FOLLOW_UP_TURNS = 3  # earlier user turns a follow-up may refer back to


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> Any: ...  # [n, d] unit rows, torch or numpy


def default_settings() -> dict[str, Any]:
    """tau, margin and placeholder from the committed calibration."""
    data = json.loads(resources.files("memory").joinpath(DEFAULTS_FILE).read_text())
    return {k: data[k] for k in ("tau", "margin", "placeholder")}


def _check_settings(tau: float | None, margin: float | None) -> None:
    if tau is not None and not 0.0 <= tau <= 1.0:
        raise ValueError(f"scope tau is a cosine in [0, 1], not {tau}")
    if margin is not None and not -1.0 <= margin <= 1.0:
        raise ValueError(f"scope margin is a difference of cosines in [-1, 1], not {margin}")


def _unique(texts: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(" ".join(t.split()) for t in texts if t and t.strip()))


@dataclass(frozen=True)
class ScopeEntry:
    """One scoped edit's scope, as plain data (texts with the subject written out)."""

    edit_id: str
    subject: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    tau: float | None = None  # None: the scope's setting
    margin: float | None = None

    def __post_init__(self) -> None:
        if not self.edit_id:
            raise ValueError("a scope entry needs an edit id")
        if not subject_key(self.subject):
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
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a scope entry ({exc}): {str(data)[:200]}") from exc


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
    query: str  # the text embedded (the subject masked)
    follow_up: bool
    type_conflict: bool = False  # it asks for another kind of answer (memory.answer_type)


@dataclass
class _Compiled:
    entry: ScopeEntry
    seq: int  # order of addition: newest first in decisions
    key: Key
    positives: tuple[str, ...]  # masked texts, rows of the scope's store
    negatives: tuple[str, ...]
    answer_types: frozenset[str]  # what its positives ask for: a person, a time, ...


class QuestionScope:
    """The scoped edits' entries and the per-request decision; thread-safe."""

    def __init__(
        self,
        encoder: Encoder,
        tau: float | None = None,
        margin: float | None = None,
        placeholder: str | None = None,
    ) -> None:
        defaults = default_settings()
        self.tau = float(defaults["tau"] if tau is None else tau)
        self.margin = float(defaults["margin"] if margin is None else margin)
        self.placeholder = str(defaults["placeholder"] if placeholder is None else placeholder)
        _check_settings(self.tau, self.margin)
        if not self.placeholder.strip():
            raise ValueError("the scope's placeholder must be a word")
        self.encoder = encoder
        self._lock = threading.Lock()
        self._entries: dict[str, _Compiled] = {}
        self._by_key: dict[Key, dict[str, _Compiled]] = {}
        self._index = SubjectIndex()
        self._store: dict[str, list[Any]] = {}  # masked text -> [float16 vector, entries using it]
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

    def masked(self, entry: ScopeEntry) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The entry's (positives, negatives) with its subject masked, as the scope embeds them;
        a negative that masks to a positive's text is dropped."""
        key = subject_key(entry.subject)
        positives = _unique([mask(t, key, self.placeholder) for t in entry.positives])
        negatives = _unique([mask(t, key, self.placeholder) for t in entry.negatives])
        return positives, tuple(t for t in negatives if t not in positives)

    def embed(self, entry: ScopeEntry) -> dict[str, np.ndarray]:
        """The vectors of an entry's masked texts, for `add` to take (so the encoder can run
        away from the thread that adds)."""
        positives, negatives = self.masked(entry)
        return {t: self._embed(t) for t in (*positives, *negatives)}

    def add(self, entry: ScopeEntry, vectors: dict[str, np.ndarray] | None = None) -> None:
        """Adds a scoped edit, embedding the texts the scope does not hold yet (unless
        `vectors`, from `embed`, has them)."""
        positives, negatives = self.masked(entry)
        with self._lock:
            have = set(self._store)
        given = vectors or {}
        fresh = {
            t: given[t] if t in given else self._embed(t)
            for t in (*positives, *negatives)
            if t not in have
        }
        key = subject_key(entry.subject)
        with self._lock:
            if entry.edit_id in self._entries:
                raise ValueError(f"{entry.edit_id} already has a scope entry")
            self._seq += 1
            types = frozenset(filter(None, map(answer_type, entry.positives)))
            compiled = _Compiled(entry, self._seq, key, positives, negatives, types)
            self._entries[entry.edit_id] = compiled
            self._by_key.setdefault(key, {})[entry.edit_id] = compiled
            self._index.add(key)
            for text in (*positives, *negatives):
                row = self._store.setdefault(text, [fresh.get(text), 0])
                if row[0] is None:  # another writer's entry brought it and took it away again
                    row[0] = self._embed(text)
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
                self._index.discard(compiled.key)
            for text in (*compiled.positives, *compiled.negatives):
                row = self._store[text]
                row[1] -= 1
                if row[1] == 0:
                    del self._store[text]
            return True

    def _embed(self, text: str) -> np.ndarray:
        return _as_numpy(self.encoder.encode([text]))[0].astype(np.float16)

    def _embed_query(self, text: str) -> np.ndarray:
        """[d] float32; through the encoder's query path where it has one (SentenceEncoder's
        keeps a message's end and caches by text)."""
        encode_query = getattr(self.encoder, "encode_query", None)
        return _as_numpy(encode_query(text) if encode_query else self.encoder.encode([text]))[0]

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
            keys, follow_up = self._index.find(last), False
            if not keys:
                keys, follow_up = self._follow_up(conversation), True
            # Per subject: its query text and its entries with their rows, newest first.
            work = []
            for key in keys:
                if follow_up:
                    query = resolve(last, self.placeholder)
                else:
                    query = mask(last, key, self.placeholder)
                for c in self._by_key[key].values():
                    rows = [self._store[t][0] for t in (*c.positives, *c.negatives)]
                    work.append((c, query, np.stack(rows)))
        work.sort(key=lambda w: -w[0].seq)
        vectors: dict[str, np.ndarray] = {}  # each distinct query embedded once
        out = []
        for c, query, rows in work:
            if query not in vectors:
                vectors[query] = self._embed_query(query)
            sims = rows @ vectors[query]  # [p + n]; float16 rows promote to float32
            p = len(c.positives)
            pos = float(sims[:p].max())
            neg = float(sims[p:].max()) if len(sims) > p else -1.0
            tau = self.tau if c.entry.tau is None else c.entry.tau
            margin = self.margin if c.entry.margin is None else c.entry.margin
            conflict = conflicts(last, c.answer_types)
            hit = pos >= tau and pos - neg >= margin and not conflict
            out.append(ScopeScore(c.entry.edit_id, pos, neg, hit, query, follow_up, conflict))
        return out

    def _follow_up(self, conversation: Sequence[str]) -> set[Key]:
        """For a last message that names no subject: the nearest earlier turn's subjects, if
        the message refers back and names no proper name that turn lacks."""
        last = conversation[-1]
        if not refers_back(last):
            return set()
        for earlier in list(conversation[-1 - FOLLOW_UP_TURNS : -1])[::-1]:
            if keys := self._index.find(earlier):
                new_names = proper_names(last) - set(normalise(earlier).split())
                return set() if new_names else keys
        return set()

    # --- persistence ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The settings and every entry, in order of addition (`from_json` restores it)."""
        return {
            "tau": self.tau,
            "margin": self.margin,
            "placeholder": self.placeholder,
            "entries": [e.to_json() for e in self.entries()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], encoder: Encoder) -> QuestionScope:
        scope = cls(encoder, data["tau"], data["margin"], data["placeholder"])
        for item in data.get("entries", ()):
            scope.add(ScopeEntry.from_json(item))
        return scope


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))
