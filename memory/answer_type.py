"""The kind of answer a question asks for: a person, a time, a place or a quantity.

A sentence encoder puts "When was the Mona Lisa painted?" right beside "Who painted the Mona
Lisa?" (the same words but one), yet one asks for a date and the other for a painter. The
question word says which, so a scoped edit whose questions all ask for a person is not in scope
of a question that asks for a time. Only clear question words count; anything else ("What is
X's capital?", a statement) has no type and constrains nothing.
"""

from __future__ import annotations

import re

_LEAD = r"^(?:and|so|but|also|then|ok(?:ay)?|well|tell me|do you know|can you tell me),?\s+"
_TYPES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("person", r"^(?:who|whom|whose)\b|^(?:which|what) (?:person|people|artist|painter|"
         r"author|writer|composer|actor|actress|singer|architect|scientist|man|woman)\b"),
        ("time", r"^when\b|^(?:in |since )?(?:what|which) (?:year|date|century|decade|month|day|"
         r"time|period|era)\b|^how long ago\b"),
        ("place", r"^where\b|^(?:in |on |to |from |at )?(?:what|which) (?:city|country|town|"
         r"village|state|province|region|continent|place|location|county|island|nation|"
         r"capital)\b"),
        ("quantity", r"^how (?:many|much|tall|big|high|long|old|far|large|heavy|wide|deep|"
         r"fast|small)\b"),
    )
)  # fmt: skip


def answer_type(text: str) -> str | None:
    """ "person", "time", "place", "quantity", or None where the question word does not say."""
    t = " ".join(text.lower().split())
    t = re.sub(_LEAD, "", t)
    for name, pattern in _TYPES:
        if pattern.search(t):
            return name
    return None


def conflicts(query: str, types: frozenset[str]) -> bool:
    """Whether `query` asks for a kind of answer none of an edit's typed questions (`types`)
    asks for; False where either side has no type."""
    asked = answer_type(query)
    return bool(types) and asked is not None and asked not in types
