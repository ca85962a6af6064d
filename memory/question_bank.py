"""Questions an edit's scope must leave out: the same subject's other relations, and chat.

A scoped edit answers questions on its own relation ("Where is the Eiffel Tower?") and must not
touch other questions about its subject ("When was the Eiffel Tower built?"). A sentence encoder
places both near the edit's prompt (they share the subject), so each edit carries negatives: the
bank's relation questions written for its subject, minus those of its own relation, and everyday
questions. These were written by hand from common relations of people, places, works,
organisations and things, not from any benchmark's relation list.

A relation is recognised in an edit's prompt by its cue words (the subject removed first, so a
subject such as "Tall Ships" cannot name a relation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    name: str
    cues: str  # a regular expression on the lower-cased prompt, the subject removed
    templates: tuple[str, ...]  # "{s}" is the subject


def _r(name: str, cues: str, *templates: str) -> Relation:
    return Relation(name, cues, templates)


RELATIONS: tuple[Relation, ...] = (
    _r("location", r"\b(where|locat\w*|situated|lies|city|town|country|region|continent|"
       r"headquarter\w*|based|address)\b",
       "Where is {s} located?", "Which country is {s} in?", "The location of {s} is"),
    _r("built", r"\b(built|constructed|construction|erected|completed|opened)\b",
       "When was {s} built?", "{s} was completed in the year"),
    _r("founded", r"\b(found\w*|establish\w*|formed|formation|incorporated|inception|started)\b",
       "When was {s} founded?", "Who founded {s}?", "{s} was founded in"),
    _r("designer", r"\b(design\w*|architect\w*|engineer\w*)\b",
       "Who designed {s}?", "The architect of {s} is"),
    _r("size", r"\b(tall|height|high|long|length|big|large|size|area|wide|width|weigh\w*|mass)\b",
       "How tall is {s}?", "How big is {s}?", "The height of {s} is"),
    _r("known_for", r"\b(known|famous|notable|significance)\b",
       "What is {s} known for?", "Why is {s} famous?"),
    _r("about", r"^$",  # never the edit's own relation: what a user asks first
       "What is {s}?", "Tell me about {s}.", "Describe {s} in a few words."),
    _r("birth_date", r"\b(born|birth\w*)\b", "When was {s} born?", "{s} was born in the year"),
    _r("birth_place", r"\b(born|birth\w*|native|hometown)\b",
       "Where was {s} born?", "The place of birth of {s} is"),
    _r("death", r"\b(die|died|death|dead|pass\w* away)\b",
       "When did {s} die?", "Where did {s} die?", "The place of death of {s} is"),
    _r("cause_of_death", r"\b(cause|illness|disease|kill\w*)\b",
       "What was the cause of death of {s}?"),
    _r("burial", r"\b(buried|burial|grave|tomb|interred)\b",
       "Where is {s} buried?", "The place of burial of {s} is"),
    _r("occupation", r"\b(occupation|profession|job|career|work\w*|do for a living|field)\b",
       "What is the occupation of {s}?", "What does {s} do for a living?",
       "The occupation of {s} is"),
    _r("office", r"\b(office|position held|title|elected|served as|president|minister)\b",
       "What position does {s} hold?", "The office held by {s} is"),
    _r("citizenship", r"\b(citizen\w*|nationality|national)\b",
       "What is the nationality of {s}?", "The country of citizenship of {s} is"),
    _r("gender", r"\b(gender|sex|male|female)\b", "What is the gender of {s}?",
       "The gender of {s} is"),
    _r("spouse", r"\b(spouse|married|marry|wife|husband|partner)\b",
       "Who is {s} married to?", "The spouse of {s} is"),
    _r("mother", r"\b(mother|mom|parent\w*)\b",
       "Who is the mother of {s}?", "The mother of {s} is"),
    _r("father", r"\b(father|dad|parent\w*)\b",
       "Who is the father of {s}?", "The father of {s} is"),
    _r("children", r"\b(child\w*|son|sons|daughter\w*|kids?)\b", "Who are the children of {s}?",
       "The child of {s} is"),
    _r("siblings", r"\b(sibling\w*|brothers?|sisters?)\b", "Who are the siblings of {s}?",
       "The sibling of {s} is"),
    _r("education", r"\b(educat\w*|alma mater|school|universit\w*|college|stud\w*|graduat\w*)\b",
       "Where did {s} study?", "The alma mater of {s} is"),
    _r("employer", r"\b(employ\w*|work\w* for|company)\b", "Who does {s} work for?",
       "The employer of {s} is"),
    _r("language", r"\b(language|speak\w*|spoken|tongue)\b",
       "What language does {s} speak?", "The official language of {s} is"),
    _r("religion", r"\b(religio\w*|faith|church)\b", "What is the religion of {s}?"),
    _r("team", r"\b(team|club|plays? for|squad)\b", "Which team does {s} play for?",
       "The sports team of {s} is"),
    _r("league", r"\b(league|division|conference)\b", "Which league does {s} play in?"),
    _r("sport", r"\b(sport|game)\b", "What sport does {s} play?"),
    _r("position", r"\b(position|role)\b", "What position does {s} play?"),
    _r("award", r"\b(award\w*|prize\w*|won|win|honou?r\w*|medal\w*|nominat\w*)\b",
       "What awards has {s} won?", "The award received by {s} is"),
    _r("owner", r"\b(own\w*|belong\w*|parent company|subsidiar\w*)\b", "Who owns {s}?"),
    _r("author", r"\b(author\w*|wr[io]te|written|writer)\b", "Who wrote {s}?",
       "The author of {s} is"),
    _r("screenwriter", r"\b(screenwrit\w*|screenplay|script\w*)\b",
       "Who wrote the screenplay of {s}?", "The screenwriter of {s} is"),
    _r("director", r"\b(direct\w*)\b", "Who directed {s}?", "The director of {s} is"),
    _r("cast", r"\b(cast|star\w*|actor|actress|acted)\b", "Who starred in {s}?",
       "The cast members of {s} are"),
    _r("maker", r"\b(develop\w*|manufactur\w*|made|make|produc\w*|creat\w*|invent\w*)\b",
       "Who created {s}?", "The manufacturer of {s} is"),
    _r("music", r"\b(compos\w*|music\w*|sing\w*|sung|perform\w*|band|instrument)\b",
       "Who composed the music of {s}?", "What instrument does {s} play?"),
    _r("label", r"\b(label|record company)\b", "Which record label released {s}?"),
    _r("genre", r"\b(genre|style|kind|type|category)\b", "What genre is {s}?"),
    _r("release", r"\b(releas\w*|publish\w*|publication|launch\w*|premiere\w*|debut\w*|"
       r"introduc\w*|came out|air\w*|first (?:shown|used))\b",
       "When was {s} released?", "{s} was first released in"),
    _r("capital", r"\b(capital)\b", "What is the capital of {s}?"),
    _r("population", r"\b(population|inhabitants|people live|residents)\b",
       "What is the population of {s}?"),
    _r("age", r"\b(old|age)\b", "How old is {s}?"),
    _r("named_after", r"\b(named|name)\b", "Who is {s} named after?"),
    _r("member_of", r"\b(member|part of|affiliat\w*|party)\b", "What is {s} a member of?"),
    _r("taxon", r"\b(family|genus|species|order|class|taxon\w*)\b",
       "What family does {s} belong to?"),
    _r("color", r"\b(colou?r\w*)\b", "What color is {s}?"),
    _r("cost", r"\b(cost\w*|price\w*|worth|expensive)\b", "How much does {s} cost?"),
)  # fmt: skip

# Everyday chat without a subject of its own: nothing about an edit's subject lies near these.
UNRELATED: tuple[str, ...] = (
    "What is the capital of France?",
    "How are you today?",
    "Tell me a joke.",
    "What is the weather like today?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "How do I bake bread?",
    "What time is it?",
    "Can you recommend a good book?",
    "What is the meaning of life?",
    "How many legs does a spider have?",
    "What is the largest ocean on Earth?",
    "Write a short poem about the sea.",
    "Translate 'good morning' into Spanish.",
    "What is two plus two?",
    "Who painted the Mona Lisa?",
    "What is photosynthesis?",
    "How far is the Moon from the Earth?",
    "Give me a recipe for pancakes.",
    "What are the symptoms of the flu?",
)


def own_relations(prompts: list[str], subject: str) -> set[str]:
    """The bank's relations an edit's prompts ask about (by cue words, the subject removed)."""
    texts = [" ".join(p.replace(subject, " ").lower().split()) for p in prompts]
    return {r.name for r in RELATIONS if any(re.search(r.cues, t) for t in texts)}


def subject_negatives(prompts: list[str], subject: str) -> list[str]:
    """The bank's questions about `subject` on relations other than the prompts' own."""
    own = own_relations(prompts, subject)
    return [t.format(s=subject) for r in RELATIONS if r.name not in own for t in r.templates]
