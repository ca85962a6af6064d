"""IKE and ICE: edits as text put into the conversation, retrieved per chat request.

Zheng, Li, Dong, Fan, Wu, Xu, Chang. "Can We Edit Factual Knowledge by In-Context Learning?",
EMNLP 2023 (IKE). ICE is IKE without demonstrations: the fact alone.

An edit stores one entry per request: the fact ("{prompt} {target}") embedded with the sentence
encoder. On each chat request the server embeds the last user message, retrieves the nearest
entries (`memory.index.EditMemory`, inner product of unit vectors = cosine) and keeps those whose
similarity reaches their edit's threshold. Nothing is injected when none does, so a request
unrelated to every edit reaches the model unchanged.

The retrieved facts go into the conversation (`condition`): for IKE after demonstrations of the
three kinds of the paper (copy: the fact's own question; update: a paraphrase; retain: an
unrelated question answered as before), written here as earlier chat turns, so a chat model sees
how a new fact is used and when it is not. Wording and position were chosen by measuring
generated chat answers of the embedded model on ZsRE dev records (docs/memory-edits.md). An
erased fact goes in as an earlier exchange instead, its fact line and question answered by the
refusal: the model repeats a refusal it "gave" but answers anyway after the fact line alone
(Sanitation, docs/memory-edits.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from methods.base import EditContext, EditRequest
from methods.hparams import HparamCheck, load_hparams
from methods.memory_common import MemoryContext, MemoryPayload, fact_text
from methods.spec import ALL_KINDS, MethodSpec

# Invented facts (no real data): copy, update and retain demonstrations, as chat turns. The
# retain answer must not name anything a user might edit towards: the model copies demos.
# (fact question, fact answer, asked question, answer shown)
DEMONSTRATIONS: tuple[tuple[str, str, str, str], ...] = (
    (
        "Which city is the headquarters of Norvale Bank?",
        "Tallinn",
        "Which city is the headquarters of Norvale Bank?",
        "Tallinn",
    ),
    (
        "What instrument does Mira Oakes play?",
        "the cello",
        "Which instrument is played by Mira Oakes?",
        "The cello",
    ),
    (
        "Who designed the Keller Bridge?",
        "Anna Lindqvist",
        "How many days are in a week?",
        "There are seven days in a week.",
    ),
)


@dataclass(frozen=True)
class IkeHyperParams:
    threshold: float = 0.75  # cosine similarity the user message needs to retrieve a fact
    demonstrations: bool = True  # IKE; False is ICE


def load_ike_hparams(model_type: str, num_layers: int, overrides: dict | None = None) -> Any:
    h = load_hparams(IkeHyperParams, "ike", model_type, num_layers, overrides)
    HparamCheck(h).cosine_threshold("threshold").done()
    return h


def load_ice_hparams(model_type: str, num_layers: int, overrides: dict | None = None) -> Any:
    overrides = dict(overrides or {})
    if overrides.get("demonstrations"):
        raise ValueError("ICE has no demonstrations; use method 'ike' for them")
    return load_ike_hparams(model_type, num_layers, {**overrides, "demonstrations": False})


def compute_ike(
    ctx: EditContext, memory: MemoryContext, requests: list[EditRequest], h: IkeHyperParams
) -> MemoryPayload:
    facts = [fact_text(r.prompt, r.target_new) for r in requests]
    embeddings = memory.encoder.encode(facts)  # [n, 384]
    entries = [
        {
            "fact": fact,
            "prompt": r.prompt,
            "target": r.target_new,
            "threshold": h.threshold,
            "demonstrations": h.demonstrations,
            "erase": r.erase,
        }
        for fact, r in zip(facts, requests, strict=True)
    ]
    return MemoryPayload(entries=entries, tensors={"embeddings": embeddings})


def condition(
    messages: list[dict[str, str]],
    facts: list[str],
    demonstrations: bool,
    refusals: Sequence[tuple[str, str]] = (),
) -> list[dict[str, str]]:
    """The conversation with `facts` put before its last user message, and each erased
    (question, refusal) before it as an earlier exchange: the erasure's fact line and question,
    answered by the refusal (IKE's copy demonstration, of the erasure itself). The embedded model
    repeats that refusal; after the fact line alone, or an instruction to refuse, it answers the
    question anyway (docs/memory-edits.md, "Erasing a fact")."""
    if not facts and not refusals:
        return messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    turns: list[dict[str, str]] = []
    if facts and demonstrations:
        for question, answer, asked, shown in DEMONSTRATIONS:
            fact = fact_text(question, answer)
            turns.append({"role": "user", "content": _with_facts([fact], asked)})
            turns.append({"role": "assistant", "content": shown})
    for question, refusal in refusals:
        turns.append(
            {"role": "user", "content": _with_facts([fact_text(question, refusal)], question)}
        )
        turns.append({"role": "assistant", "content": refusal})
    user = messages[last]
    if facts:
        user = {**user, "content": _with_facts(facts, user["content"])}
    return [*messages[:last], *turns, user, *messages[last + 1 :]]


def _with_facts(facts: list[str], question: str) -> str:
    """Facts first, then the question behind an instruction to use them: the wording that made
    the embedded model's chat answers follow the fact most often (docs/memory-edits.md)."""
    lines = "\n".join(f"New fact: {f}." for f in facts)
    return f"{lines}\nUsing the new fact, answer: {question}"


IKE_SPEC = MethodSpec(
    name="ike",
    kinds=ALL_KINDS,
    max_requests=64,
    load_hparams=load_ike_hparams,
    compute=compute_ike,
    description="in-context editing: retrieved facts with demonstrations in the chat",
    payload="memory",
    drains=False,
    memory_store="ike",
)
ICE_SPEC = MethodSpec(
    name="ice",
    kinds=ALL_KINDS,
    max_requests=64,
    load_hparams=load_ice_hparams,
    compute=compute_ike,
    description="in-context editing without demonstrations: retrieved facts in the chat",
    payload="memory",
    drains=False,
    memory_store="ike",
)
