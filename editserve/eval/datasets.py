"""The benchmark files, read into one record shape.

Formats (recognised from their fields, so a path is all a user gives):
- KnowEdit ZsRE, WikiData_recent, WikiData_counterfact (`prompt`, `target_new`, `subject`,
  `locality` and `portability` groups), WikiBio (`text`, `labels`, `concept`), ConvSent (`ent`,
  `pos`, `neg`), Sanitation (`{success: [...], locality: [...]}`);
- CounterFact, in EasyEdit's flat form (`locality_prompt`) and ROME's (`requested_rewrite`);
- ZsRE in MEND's form (`src`, `alt`, `loc`), with its portability variants;
- MQuAKE (a list of `requested_rewrite`s and multi-hop `questions`).

Records come in file order: the first N are the same N on every run.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFUSAL = "I don't know."


@dataclass(frozen=True)
class Probe:
    """A prompt and the answers accepted for it; the first is the teacher-forced target."""

    prompt: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Sentiment:
    """ConvSent: responses with the sentiment the edit asks for, and with the other one."""

    target: str
    target_texts: tuple[str, ...]
    other_texts: tuple[str, ...]


@dataclass(frozen=True)
class EvalRecord:
    index: int
    requests: tuple[dict[str, Any], ...]  # the `requests` of POST /edits
    reliability: tuple[Probe, ...]
    generalization: tuple[Probe, ...] = ()
    portability: dict[str, tuple[Probe, ...]] = field(default_factory=dict)
    locality: dict[str, tuple[Probe, ...]] = field(default_factory=dict)
    kind: str = "modify"  # the edit kind: modify, or erase (Sanitation)
    sentiment: Sentiment | None = None

    def probes(self) -> dict[str, tuple[Probe, ...] | dict[str, tuple[Probe, ...]]]:
        return {
            "reliability": self.reliability,
            "generalization": self.generalization,
            "portability": self.portability,
            "locality": self.locality,
        }


def answers(ground_truth: Any) -> tuple[str, ...]:
    """KnowEdit's answer shapes ("x", ["x"], [["x", "alias"], ...]) as one flat alias list."""
    if ground_truth is None:
        return ()
    if isinstance(ground_truth, str):
        return (ground_truth,)
    out: list[str] = []
    for item in ground_truth:
        out.extend(answers(item))
    return tuple(dict.fromkeys(a for a in out if a.strip()))


def _groups(raw: dict | None, limit: int | None) -> dict[str, tuple[Probe, ...]]:
    out = {}
    for key, items in (raw or {}).items():
        probes = tuple(Probe(i["prompt"], answers(i["ground_truth"])) for i in items)
        probes = tuple(p for p in probes if p.answers)[:limit]
        if probes:
            out[key] = probes
    return out


def _request(prompt: str, subject: str, target: str, true: str | None = None) -> dict[str, Any]:
    # Paraphrases and locality prompts are not sent: a method that used them would be tested on
    # what it was shown.
    req = {"prompt": prompt, "subject": subject, "target_new": target}
    return req | ({"target_true": true} if true else {})


# -- one converter per format ---------------------------------------------------------------------


def _knowedit(i: int, r: dict, limit: int | None, rng: random.Random) -> EvalRecord:
    truth = answers(r.get("ground_truth"))
    return EvalRecord(
        index=i,
        requests=(
            _request(r["prompt"], r["subject"], r["target_new"], truth[0] if truth else None),
        ),
        reliability=(Probe(r["prompt"], (r["target_new"],)),),
        generalization=tuple(
            Probe(p, (r["target_new"],)) for p in answers(r.get("rephrase_prompt"))
        ),
        portability=_groups(r.get("portability"), limit),
        locality=_groups(r.get("locality"), limit),
    )


def _wikibio(i: int, r: dict, limit: int | None, rng: random.Random) -> EvalRecord:
    return EvalRecord(
        index=i,
        requests=(_request(r["text"], r["concept"], r["labels"]),),
        reliability=(Probe(r["text"], (r["labels"],)),),
        locality=_groups(r.get("locality"), limit),
    )


CONVSENT_PROMPT = "What do you think of {}?"


def _convsent(i: int, r: dict, limit: int | None, rng: random.Random) -> EvalRecord:
    # The edit asks for one sentiment about the topic, drawn with the run's seed.
    target = rng.choice(("positive", "negative"))
    pos = tuple(t.strip() for t in r["pos"] if t.strip())
    neg = tuple(t.strip() for t in r["neg"] if t.strip())
    mine, other = (pos, neg) if target == "positive" else (neg, pos)
    prompt = CONVSENT_PROMPT.format(r["ent"])
    return EvalRecord(
        index=i,
        requests=(_request(prompt, r["ent"], mine[0]),),
        reliability=(Probe(prompt, (mine[0],)),),
        sentiment=Sentiment(target, mine[:limit], other[:limit]),
    )


# Words that open a question or sentence and are capitalised only for that reason.
_OPENERS = {
    "A",
    "An",
    "The",
    "If",
    "For",
    "In",
    "On",
    "At",
    "By",
    "Before",
    "After",
    "According",
    "What",
    "Which",
    "Who",
    "Whom",
    "Whose",
    "Where",
    "When",
    "Why",
    "How",
}
_IS_A_X = re.compile(r"\b(?:is|are|was|were) (?:a|an|the) ([\w'-]+)\s*\?\s*$")
_A_X_IS = re.compile(r"^(?:A|An|The) ([\w'-]+) (?:is|are|was|were)\b")


def guess_subject(question: str) -> str:
    """Sanitation questions carry no subject; ROME-like methods need one that occurs in the
    prompt. In order: the X of "... is a X?" or "A X is ...", the longest run of capitalised
    words (not a sentence opener; with a final lower-case word before the "?", as in "the
    Australian currawong?"), else the longest word."""
    for pattern in (_IS_A_X, _A_X_IS):
        if m := pattern.search(question):
            return m.group(1)
    words = re.findall(r"[\w'-]+", question)
    runs, run = [], []
    for j, w in enumerate(words):
        if w[:1].isupper() and not (j == 0 and w in _OPENERS):
            run.append(w)
            continue
        after_article = j - len(run) - 1 >= 0 and words[j - len(run) - 1].lower() in (
            "a",
            "an",
            "the",
        )
        if run and after_article and j == len(words) - 1 and question.rstrip().endswith("?"):
            run.append(w)  # "the Australian currawong?": the noun the adjective belongs to
        if run:
            runs.append(run)
        run = []
    if run:
        runs.append(run)
    for candidate in sorted(runs, key=len, reverse=True):
        if (text := " ".join(candidate)) in question:
            return text
    return max(reversed(words), key=len)


def _sanitation(data: dict, limit: int | None, seed: int) -> list[EvalRecord]:
    # The train file names its lists K_F (to forget) and K_R (to retain), with a subject.
    keep = data["locality"] if "locality" in data else data["K_R"]
    per = limit or 2
    out = []
    for i, r in enumerate(data["success"] if "success" in data else data["K_F"]):
        # Each edit is checked on `per` of the questions it must keep, rotating through them.
        loc = tuple(
            Probe(
                keep[(i * per + j) % len(keep)]["question"],
                answers(keep[(i * per + j) % len(keep)]["ground_truth"]),
            )
            for j in range(per)
        )
        target = r.get("target_new") or REFUSAL
        truth = answers(r.get("ground_truth"))
        out.append(
            EvalRecord(
                index=i,
                requests=(
                    _request(
                        r["question"],
                        r["subject"]
                        if r.get("subject") and r["subject"] in r["question"]
                        else guess_subject(r["question"]),
                        target,
                        truth[0] if truth else None,
                    ),
                ),
                reliability=(Probe(r["question"], (target,)),),
                locality={"Knowledge_Retained": loc},
                kind="erase",
            )
        )
    return out


def _counterfact_flat(i: int, r: dict, limit: int | None, rng: random.Random) -> EvalRecord:
    loc = {}
    if r.get("locality_prompt"):
        loc = {"Neighborhood": (Probe(r["locality_prompt"], answers(r["locality_ground_truth"])),)}
    return EvalRecord(
        index=i,
        requests=(_request(r["prompt"], r["subject"], r["target_new"], r.get("ground_truth")),),
        reliability=(Probe(r["prompt"], (r["target_new"],)),),
        generalization=tuple(
            Probe(p, (r["target_new"],)) for p in answers(r.get("rephrase_prompt"))
        ),
        locality=loc,
    )


def _counterfact_rome(i: int, r: dict, limit: int | None, rng: random.Random) -> EvalRecord:
    rw = r["requested_rewrite"]
    subject, new, true = rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"]
    prompt = rw["prompt"].replace("{}", subject)
    portability: dict[str, tuple[Probe, ...]] = {}
    if r.get("portability"):
        p = r["portability"]
        portability["Reasoning"] = (Probe(p["New Question"], answers(p["New Answer"])),)
    if r.get("alternative_subject"):
        alias = rw["prompt"].replace("{}", r["alternative_subject"])
        portability["Subject_Aliasing"] = (Probe(alias, (new,)),)
    return EvalRecord(
        index=i,
        requests=(_request(prompt, subject, new, true),),
        reliability=(Probe(prompt, (new,)),),
        generalization=tuple(Probe(p, (new,)) for p in r.get("paraphrase_prompts", [])[:limit]),
        portability=portability,
        # The neighbours share the relation and the old object: their answer stays target_true.
        locality={
            "Neighborhood": tuple(Probe(p, (true,)) for p in r.get("neighborhood_prompts", []))[
                :limit
            ]
        },
    )


def _zsre_mend(i: int, r: dict, limit: int | None, rng: random.Random) -> EvalRecord:
    truth = answers(r.get("answers"))
    portability: dict[str, tuple[Probe, ...]] = {}
    if r.get("portability"):
        p = r["portability"]
        portability["Reasoning"] = (Probe(p["New Question"], answers(p["New Answer"])),)
    if r.get("inverse question"):
        portability["Inverse_Relation"] = (Probe(r["inverse question"], (r["subject"],)),)
    if r.get("alter_subject_question"):
        portability["Subject_Aliasing"] = (Probe(r["alter_subject_question"], (r["alt"],)),)
    locality = {}
    if r.get("loc"):
        question = re.sub(r"^nq question:\s*", "", r["loc"])
        locality["NQ"] = (Probe(question[:1].upper() + question[1:] + "?", answers(r["loc_ans"])),)
    return EvalRecord(
        index=i,
        requests=(_request(r["src"], r["subject"], r["alt"], truth[0] if truth else None),),
        reliability=(Probe(r["src"], (r["alt"],)),),
        generalization=tuple(Probe(p, (r["alt"],)) for p in answers(r.get("rephrase"))),
        portability=portability,
        locality=locality,
    )


def _mquake(i: int, r: dict, limit: int | None, rng: random.Random) -> EvalRecord:
    rewrites = r["requested_rewrite"]
    requests, reliability, cloze = [], [], []
    for rw in rewrites:
        subject, new = rw["subject"], rw["target_new"]["str"]
        statement = rw["prompt"].replace("{}", subject)
        question = rw.get("question") or statement
        requests.append(_request(question, subject, new, rw["target_true"]["str"]))
        reliability.append(Probe(question, (new,)))
        if question != statement:
            cloze.append(Probe(statement, (new,)))
    accepted = (r["new_answer"], *r.get("new_answer_alias", []))
    # Single hops the edits leave alone (same answer before and after) must keep their answers.
    kept = [
        Probe(old["question"], (old["answer"], *old.get("answer_alias", [])))
        for old, new in zip(r.get("single_hops", []), r.get("new_single_hops", []), strict=False)
        if old["answer"] == new["answer"]
    ]
    return EvalRecord(
        index=i,
        requests=tuple(requests),
        reliability=tuple(reliability),
        generalization=tuple(cloze),
        portability={"Multi_Hop": tuple(Probe(q, accepted) for q in r["questions"][:limit])},
        locality={"Unchanged_Hops": tuple(kept[:limit])} if kept else {},
    )


Converter = Callable[[int, dict, "int | None", random.Random], EvalRecord]


def detect(first: dict) -> tuple[str, Converter]:
    """The format of a file from the fields of its first record."""
    if isinstance(first.get("requested_rewrite"), list):
        return "mquake", _mquake
    if isinstance(first.get("requested_rewrite"), dict):
        return "counterfact_rome", _counterfact_rome
    if {"src", "alt"} <= first.keys():
        return "zsre_mend", _zsre_mend
    if {"ent", "pos", "neg"} <= first.keys():
        return "convsent", _convsent
    if {"text", "labels", "concept"} <= first.keys():
        return "wikibio", _wikibio
    if "locality_prompt" in first:
        return "counterfact_easyedit", _counterfact_flat
    if {"prompt", "target_new", "subject"} <= first.keys():
        return "knowedit", _knowedit
    raise ValueError(f"unrecognised record fields: {sorted(first)}")


def load(
    path: str | Path,
    n: int | None = None,
    seed: int = 0,
    max_probes: int | None = None,
    start: int = 0,
) -> tuple[str, list[EvalRecord]]:
    """(format name, n records from file position `start`; all the rest with n None). A record's
    index is its position in the file. max_probes caps each portability/locality group."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    data = json.loads(path.read_text())
    stop = None if n is None else start + n
    if isinstance(data, dict) and (
        {"success", "locality"} <= data.keys() or {"K_F", "K_R"} <= data.keys()
    ):
        return "sanitation", _sanitation(data, max_probes, seed)[start:stop]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    name, convert = detect(data[0])
    rng = random.Random(seed)  # one stream per file, so record i draws the same on every run
    # Records before `start` are converted too: ConvSent's draws depend on them.
    return name, [convert(i, r, max_probes, rng) for i, r in enumerate(data[:stop])][start:]
