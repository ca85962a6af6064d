"""Question forms of an edit's prompt, written by templates (no model, deterministic).

An edit may be written as a statement to complete, as CounterFact writes them ("The Eiffel Tower
is located in the city of"), or as a question ("In which city is the Eiffel Tower?"). Users ask
questions, so an edit's scope must reach the questions its prompt stands for: `rewordings` turns
a statement into the questions it answers ("In which city is the Eiffel Tower located?", "Which
city is the Eiffel Tower located in?", "Where is the Eiffel Tower located?") and a question into
a couple of rewordings of it ("Which city is the Eiffel Tower in?"). These become positives of
the edit's scope (memory/question_scope.py); a form that loses the subject is dropped.

The rules read the words around the first auxiliary verb after the subject and the preposition
phrase the statement ends on; a statement they cannot parse gets the echo question ("The Eiffel
Tower is located in the city of what?"), which the sentence encoder still places near it.
"""

from __future__ import annotations

import re

AUX = ("is", "are", "was", "were", "has", "have", "had", "can", "will", "does", "do", "did")
COPULAS = ("is", "are", "was", "were")
PREPOSITIONS = ("in", "on", "at", "from", "by", "of", "for", "to", "with", "into", "as", "under")
ARTICLES = ("the", "a", "an")
WH_WORDS = ("what", "which", "who", "whom", "whose", "where", "when", "why", "how")
# Nouns of places, for "Where ...?"; of people, for "Who ...?"
PLACES = ("city", "country", "town", "state", "region", "continent", "place", "location", "area")
PEOPLE = (
    "mother", "father", "parent", "parents", "spouse", "wife", "husband", "child", "children",
    "son", "daughter", "sibling", "siblings", "brother", "sister", "founder", "author", "director",
    "creator", "designer", "architect", "leader", "president", "owner", "coach", "composer",
    "producer", "head", "chairperson", "ceo", "partner",
)  # fmt: skip


def is_question(text: str) -> bool:
    words = text.strip().split()
    if not words:
        return False
    return text.rstrip().endswith("?") or words[0].lower() in WH_WORDS


def rewordings(prompt: str, subject: str) -> list[str]:
    """Questions for `prompt` (a statement or a question) that keep `subject`; the prompt itself
    is not among them. Deterministic: the same input gives the same list, in the same order."""
    text = " ".join(prompt.split())
    forms = _question_rewordings(text) if is_question(text) else _statement_questions(text, subject)
    out = []
    for form in forms:
        form = " ".join(form.split())
        if subject in form and form != text and form not in out:
            out.append(form)
    return out


# -- statements ------------------------------------------------------------------------------


def _lower_article(phrase: str) -> str:
    """The Eiffel Tower -> the Eiffel Tower: the phrase moves inside a question."""
    first, _, rest = phrase.partition(" ")
    return f"{first.lower()} {rest}" if first in ("The", "A", "An") and rest else phrase


def _strip_articles(words: list[str]) -> list[str]:
    while words and words[-1].lower() in ARTICLES:
        words = words[:-1]
    return words


def _verb_lemma(verb: str) -> str | None:
    """The base form of a third-person present verb ("plays" -> "play"), else None."""
    v = verb.lower()
    if len(v) < 4 or not v.endswith("s") or v.endswith("ss"):
        return None
    if v.endswith("ies"):
        return v[:-3] + "y"
    if v.endswith(("ches", "shes", "sses", "xes", "zes")):
        return v[:-2]
    return v[:-1]


def _statement_questions(text: str, subject: str) -> list[str]:
    s = text.rstrip(" .,:;")
    words = s.split()
    forms: list[str] = []
    if len(words) >= 2 and words[-1].lower() in COPULAS:
        forms += _copula_final(" ".join(words[:-1]), words[-1].lower(), subject)
    elif subject and subject in s:
        at = s.index(subject) + len(subject)
        head, tail = s[:at], s[at:].split()
        # The first auxiliary after the subject splits noun phrase and predicate.
        j = next((k for k, w in enumerate(tail) if w.lower() in AUX), None)
        if j is not None and j <= 3:
            np_ = _lower_article(" ".join([head, *tail[:j]]))
            forms += _predicate(np_, tail[j].lower(), tail[j + 1 :])
        else:
            # "X plays the", "X professionally plays the sport of": one adverb may come first
            adverb = tail[:1] if tail and tail[0].lower().endswith("ly") else []
            verb = tail[len(adverb)] if len(tail) > len(adverb) else ""
            if lemma := _verb_lemma(verb):
                rest = [*adverb, lemma, *tail[len(adverb) + 1 :]]
                forms += _predicate(_lower_article(head), "does", rest)
    forms.append(f"{s} what?")  # the echo question: always a fair reading of the statement
    return forms


def _head_nouns(phrase: str) -> set[str]:
    """The words of `phrase` that head a noun phrase: before "of", or last ("mother" in "the
    mother of X" and "X's mother", not in "X's mother tongue")."""
    words = [w.lower().removesuffix("'s").strip(",") for w in phrase.split()]
    return {w for k, w in enumerate(words) if k == len(words) - 1 or words[k + 1] == "of"}


def _copula_final(body: str, aux: str, subject: str) -> list[str]:
    """Questions for a statement ending on its verb: "The occupation of X is" -> "What is the
    occupation of X?", "What is X's occupation?" (and Who/Where forms)."""
    np_ = _lower_article(body)
    forms = [f"What {aux} {np_}?"]
    short = re.sub(r"^the names? of ", "", np_)  # "the name of the spouse of X" -> the spouse
    if short != np_:
        forms.append(f"What {aux} {short}?")
    heads = _head_nouns(short)
    wh = "Who" if heads & set(PEOPLE) else "Where" if heads & set(PLACES) else "What"
    if wh != "What":
        forms.append(f"{wh} {aux} {short}?")
    if subject and short.startswith("the ") and short.endswith(f" of {subject}"):
        noun = short[4 : -len(f" of {subject}")]
        forms.append(f"{wh} {aux} {subject}'s {noun}?")
    return forms


def _predicate(np_: str, aux: str, rest: list[str]) -> list[str]:
    """Questions for "{np} {aux} {rest}", rest ending on a preposition phrase or a complement."""
    rest = _strip_articles(rest)
    if not rest:
        return [f"What {aux} {np_}?"]
    low = [w.lower() for w in rest]
    forms: list[str] = []
    # "... located in the city of" -> noun "city", verb "located", preposition "in"
    if len(rest) >= 3 and low[-1] == "of" and low[-3] in ARTICLES:
        noun, before = rest[-2], rest[:-3]
        if before and before[-1].lower() in PREPOSITIONS:
            prep, verb = before[-1].lower(), " ".join(before[:-1])
            forms += [
                f"{prep.capitalize()} which {noun} {aux} {np_} {verb}?",
                f"Which {noun} {aux} {np_} {verb} {prep}?",
                f"What {noun} {aux} {np_} {verb} {prep}?",
            ]
            if noun.lower() in PLACES:
                forms.append(f"Where {aux} {np_} {verb}?")
        elif before:  # "X professionally plays the sport of" -> "Which sport does X ... play?"
            forms.append(f"Which {noun} {aux} {np_} {' '.join(before)}?")
    elif low[-1] in PREPOSITIONS:  # "X was born in" -> "Where was X born?"
        prep, verb = low[-1], " ".join(rest[:-1])
        forms.append(f"What {aux} {np_} {verb} {prep}?")
        if prep in ("in", "at") and verb:
            forms.append(f"Where {aux} {np_} {verb}?")
        if prep == "by" and verb:
            forms.append(f"Who {aux} {np_} {verb} by?")
    forms.append(f"What {aux} {np_} {' '.join(rest)}?")
    return forms


# -- questions -------------------------------------------------------------------------------

_FRONTED = re.compile(
    r"^(?P<prep>In|On|At|From|For|To|With|By|Of) (?:which|what) (?P<noun>[\w-]+) "
    r"(?P<aux>is|are|was|were|does|do|did|has|have|had) (?P<rest>.+?)\s*\?$",
    re.IGNORECASE,
)
_STRANDED = re.compile(
    r"^(?:Which|What) (?P<noun>[\w-]+) (?P<aux>is|are|was|were|does|do|did|has|have|had) "
    r"(?P<rest>.+?) (?P<prep>in|on|at|from|for|to|with|by|of)\s*\?$",
    re.IGNORECASE,
)
_OF_PHRASE = re.compile(
    r"^(?P<wh>Who|What) (?P<aux>is|are|was|were) the (?P<noun>[\w -]+?) of (?P<owner>.+?)\s*\?$"
)
_WHEN = re.compile(
    r"^(?:(?:In|On|During) )?(?:what|which) (?:year|date|day|month|decade|century) (?P<rest>.+)$",
    re.IGNORECASE,
)
_WHERE = re.compile(r"^Where (?P<aux>is|are|was|were) (?P<rest>.+?)\s*\?$", re.IGNORECASE)


def _question_rewordings(q: str) -> list[str]:
    forms: list[str] = []
    if m := _FRONTED.match(q):  # "In which city is X?" -> "Which city is X in?"
        forms.append(f"Which {m['noun']} {m['aux']} {m['rest']} {m['prep'].lower()}?")
        if m["noun"].lower() in PLACES and m["prep"].lower() in ("in", "at"):
            forms.append(f"Where {m['aux']} {m['rest']}?")
    elif m := _STRANDED.match(q):  # "Which city is X in?" -> "In which city is X?"
        forms.append(f"{m['prep'].capitalize()} which {m['noun']} {m['aux']} {m['rest']}?")
        if m["noun"].lower() in PLACES and m["prep"].lower() in ("in", "at"):
            forms.append(f"Where {m['aux']} {m['rest']}?")
    elif m := _WHERE.match(q):  # "Where is X?" -> "Where is X located?", "In which place ..."
        rest = m["rest"]
        if not rest.endswith(" located"):
            forms.append(f"Where {m['aux']} {rest} located?")
        forms.append(f"In which place {m['aux']} {rest}?")
    if (m := _OF_PHRASE.match(q)) and " of " not in m["owner"]:  # "Who is X's mother?"
        forms.append(f"{m['wh']} {m['aux']} {m['owner']}'s {m['noun']}?")
    if m := _WHEN.match(q):  # "What year did X come into use?" -> "When did X come into use?"
        forms.append(f"When {m['rest']}")
    words = q.split()
    # "What year did X ...?" <-> "Which year did X ...?" (not "What is X?": "Which is X?")
    if len(words) > 2 and words[1].lower() not in AUX:
        if words[0] == "What":
            forms.append(" ".join(["Which", *words[1:]]))
        elif words[0] == "Which":
            forms.append(" ".join(["What", *words[1:]]))
    return forms
