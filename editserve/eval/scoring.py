"""Observations (from `measure`) to KnowEdit metrics, for one record; pure functions.

Every metric comes twice: `_tf`, teacher-forced token accuracy on the raw prompt (comparable
with published KnowEdit/EasyEdit tables), and `_gen`, judged on the greedy chat answer (what a
user sees). Locality compares the edited model's observations with the unedited model's. Two
readings keep the success figures honest: the target leak (locality answers that name the
edit's target, minus the unedited model's share on the same probes) and bare answers (the
share of successful answers that are the target and nothing more). Each metric also counts
the probes it rests on (`<metric>_probes`), so a table can mark a figure resting on few.
"""

from __future__ import annotations

from typing import Any

from editserve.eval.datasets import EvalRecord, Probe
from editserve.eval.metrics import (
    agreement,
    bare_answer,
    contains_answer,
    grouped_mean,
    judged_sentiment,
    mean,
    ngram_entropy,
    sentiment_edit_success,
    token_accuracy,
)

METRICS = (
    "reliability_tf",
    "reliability_gen",
    "generalization_tf",
    "generalization_gen",
    "portability_tf",
    "portability_gen",
    "locality_tf",
    "locality_gen",
    "target_leak_gen",
    "fluency_raw",
    "fluency_chat",
    "bare_gen",
)


def _hits(obs: dict) -> list[bool]:
    return [t == a for t, a in zip(obs["tokens"], obs["top1"], strict=True)]


def _contained(probes: tuple[Probe, ...], observed: list[dict]) -> list[float]:
    """1.0 for each chat answer that contains an accepted answer of its probe."""
    return [
        float(contains_answer(o["answer"], p.answers))
        for p, o in zip(probes, observed, strict=True)
    ]


def _success(probes: tuple[Probe, ...], observed: list[dict]) -> tuple[float | None, float | None]:
    tf = mean(token_accuracy(_hits(o)) for o in observed)
    return tf, mean(_contained(probes, observed))


def _sentiment_answers(record: EvalRecord, post: dict[str, Any]) -> list[float]:
    """ConvSent: 1.0 for each chat answer to the edit prompt read as the target sentiment."""
    target = record.sentiment.target
    return [float(judged_sentiment(o["answer"]) == target) for o in post["reliability"]]


def _portability_answers(record: EvalRecord, post: dict[str, Any]) -> dict[str, list[float]]:
    """Per portability group, 1.0 for each chat answer that contains an accepted answer."""
    return {
        key: _contained(probes, post["portability"][key])
        for key, probes in record.portability.items()
    }


def _locality_answers(
    record: EvalRecord, post: dict[str, Any], pre: dict[str, Any]
) -> dict[str, list[float]]:
    """Per locality group, 1.0 for each chat answer the edit left word for word unchanged."""
    return {
        key: [
            float(b["answer"] == a["answer"])
            for b, a in zip(pre["locality"][key], post["locality"][key], strict=True)
        ]
        for key in record.locality
    }


def targets(record: EvalRecord) -> tuple[str, ...]:
    """The new answers the record's edits teach (several for a chain of edits)."""
    return tuple(t for r in record.requests if (t := (r.get("target_new") or "").strip()))


def _naming_target(record: EvalRecord, observed: dict[str, Any]) -> dict[str, list[float]]:
    """Per locality group, 1.0 for each chat answer that names one of the edit's targets."""
    wanted = targets(record)
    return {
        key: [float(contains_answer(o["answer"], wanted)) for o in observed["locality"][key]]
        for key in record.locality
    }


def _flat(groups: dict[str, list[float]]) -> list[float]:
    return [v for values in groups.values() for v in values]


def _bare(record: EvalRecord, post: dict[str, Any]) -> list[float]:
    """1.0 for each successful edit-prompt or paraphrase chat answer that is only the target."""
    pairs = list(zip(record.reliability, post["reliability"], strict=True))
    if record.generalization:
        pairs += zip(record.generalization, post["generalization"], strict=True)
    return [
        float(bare_answer(o["answer"], p.answers))
        for p, o in pairs
        if contains_answer(o["answer"], p.answers)
    ]


def score(record: EvalRecord, post: dict[str, Any], pre: dict[str, Any]) -> dict[str, Any]:
    """Metrics of one record, in [0, 1] (fluency in bits; the target leak in [-1, 1]); None where
    the record has no probe. Scoring the unedited model against itself (post = pre) gives its
    own figures (its target leak is 0 by definition). `<metric>_probes` counts the probes (or
    texts) behind each metric that is not None."""
    out: dict[str, Any] = dict.fromkeys(METRICS)
    probes: dict[str, int] = {
        "reliability_tf": len(record.reliability),
        "reliability_gen": len(record.reliability),
    }
    out["reliability_tf"], out["reliability_gen"] = _success(
        record.reliability, post["reliability"]
    )
    if record.generalization:
        out["generalization_tf"], out["generalization_gen"] = _success(
            record.generalization, post["generalization"]
        )
        probes["generalization_tf"] = probes["generalization_gen"] = len(record.generalization)
    if record.portability:
        tf = {
            key: [token_accuracy(_hits(o)) for o in post["portability"][key]]
            for key in record.portability
        }
        out["portability_tf"] = grouped_mean(tf)
        out["portability_gen"] = grouped_mean(_portability_answers(record, post))
        probes["portability_tf"] = probes["portability_gen"] = len(_flat(tf))
    if record.locality:
        tf = {}
        for key in record.locality:
            pairs = zip(pre["locality"][key], post["locality"][key], strict=True)
            tf[key] = [agreement(b["top1"], a["top1"]) for b, a in pairs]
        out["locality_tf"] = grouped_mean(tf)
        out["locality_gen"] = grouped_mean(_locality_answers(record, post, pre))
        probes["locality_tf"] = probes["locality_gen"] = len(_flat(tf))
        if targets(record):
            after, before = _flat(_naming_target(record, post)), _flat(_naming_target(record, pre))
            out["target_leak_gen"] = (sum(after) - sum(before)) / len(after) if after else None
            probes["target_leak_gen"] = len(after)
    if post.get("fluency"):
        out["fluency_raw"] = ngram_entropy(post["fluency"]["raw"])
        out["fluency_chat"] = ngram_entropy(post["fluency"]["chat"])
        probes["fluency_raw"] = probes["fluency_chat"] = 1
    if record.sentiment is not None:
        # ConvSent (KnowEdit, after SERAC): edit success is about sentiment, not the target
        # response's tokens: SERAC's score from logprobs, and the chat answer's judged sentiment.
        t_post, o_post = mean(post["sentiment"]["target"]), mean(post["sentiment"]["other"])
        t_pre = mean(pre["sentiment"]["target"])
        out["reliability_tf"] = sentiment_edit_success(t_post or 0.0, o_post or 0.0, t_pre or 0.0)
        out["reliability_gen"] = mean(_sentiment_answers(record, post))
    else:
        bare = _bare(record, post)
        out["bare_gen"] = mean(bare)
        probes["bare_gen"] = len(bare)
    for name, count in probes.items():
        if out[name] is not None:
            out[f"{name}_probes"] = count
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over records of each metric, ×100 as KnowEdit reports them (fluency: bits ×100),
    with the number of records each mean covers (`_n`) and of probes behind it (`_probes`;
    rows scored before probes were counted count one per record)."""
    out: dict[str, Any] = {}
    for name in METRICS:
        kept = [r for r in rows if r.get(name) is not None]
        values = [r[name] for r in kept]
        out[name] = round(100 * sum(values) / len(values), 2) if values else None
        out[f"{name}_n"] = len(values)
        out[f"{name}_probes"] = sum(r.get(f"{name}_probes", 1) for r in kept)
    return out


def _case_answers(
    record: EvalRecord, post: dict[str, Any], portability: dict[str, list[float]]
) -> dict[str, list[float]]:
    """A record that chains several edits (MQuAKE) counted as one case, as MQuAKE reads it:
    whether every edit's answer came back, and per portability group (`portability`, its
    `_portability_answers`) whether any of its questions was answered right (the multi-hop
    questions are paraphrases of one chain)."""
    recalled = _contained(record.reliability, post["reliability"])
    out = {"all edits recalled": [float(all(recalled))]}
    for key, hits in portability.items():
        out[f"{key} any"] = [float(any(hits))]
    return out


def probe_counts(record: EvalRecord, post: dict[str, Any], pre: dict[str, Any]) -> dict[str, Any]:
    """Chat answers per probe group, as [counted, probes]: portability answers that contain an
    accepted answer, locality answers left unchanged. The means above weigh every record alike
    and hide which kind of probe moved; these counts show it. ConvSent records add their edit
    answers read as the target sentiment, and those containing the whole target response, both
    grouped by the target sentiment: the unedited model leans to one side, so the two targets
    start far apart. Records that chain several edits add their case-level reading
    (`_case_answers`), one count per record."""
    portability = _portability_answers(record, post)
    groups = {"portability": portability, "locality": _locality_answers(record, post, pre)}
    if record.locality and targets(record):
        groups["leak"] = _naming_target(record, post)
    if len(record.requests) > 1:
        groups["cases"] = _case_answers(record, post, portability)
    if record.sentiment is not None:
        groups["sentiment"] = {record.sentiment.target: _sentiment_answers(record, post)}
        # The judge misses most negative targets (docs/eval.md): whether the answer repeats the
        # whole target response (normalised containment) is read beside it.
        groups["verbatim"] = {
            record.sentiment.target: _contained(record.reliability, post["reliability"])
        }
    return {
        kind: {key: [int(sum(values)), len(values)] for key, values in found.items()}
        for kind, found in groups.items()
    }


def add_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`probe_counts` of many records, summed group by group."""
    total: dict[str, Any] = {"portability": {}, "locality": {}}
    for row in rows:
        for kind, found in row.items():
            for key, (counted, probes) in found.items():
                into = total.setdefault(kind, {}).setdefault(key, [0, 0])
                into[0] += counted
                into[1] += probes
    return total
