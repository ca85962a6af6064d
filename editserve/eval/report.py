"""Markdown tables of evaluation results (KnowEdit's ×100 scale; fluency in bits ×100)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

# Methods that condition chat prompts (or, GRACE, fire on chat-template keys only): the raw-text
# teacher-forced probes never reach them, so their TF columns are the unedited model's by design.
MEMORY_METHODS = frozenset({"ike", "ice", "serac", "grace"})
BY_DESIGN = "n/a (by design)"
FEW_PROBES = 30  # a figure resting on fewer probes carries its count: "42.0 (n=12)"

COLUMNS = (
    ("reliability_tf", "Rel. TF"),
    ("reliability_gen", "Rel. gen"),
    ("generalization_tf", "Gen. TF"),
    ("generalization_gen", "Gen. gen"),
    ("portability_tf", "Port. TF"),
    ("portability_gen", "Port. gen"),
    ("locality_tf", "Loc. TF"),
    ("locality_gen", "Loc. gen"),
    ("target_leak_gen", "Leak gen"),
    ("fluency_raw", "Flu. raw"),
    ("fluency_chat", "Flu. chat"),
    ("bare_gen", "Bare gen"),
)

LEGEND = (
    "TF: teacher-forced token accuracy on the raw prompt via /v1/completions (comparable with "
    "KnowEdit tables); gen: judged on the greedy chat answer (what users see). Rel.: edit "
    "success on the edit prompt; Gen.: on paraphrases; Port.: portability; Loc.: agreement "
    "with the unedited model; Flu.: n-gram entropy ×100 of a sampled raw continuation and of "
    "the chat answer. Leak gen: locality chat answers that name the edit's target, minus the "
    "unedited model's share on the same probes (points; 0 for the unedited model). Bare gen: "
    "the share of successful edit-prompt and paraphrase chat answers that are only the target "
    "(at most three words, normalised). ConvSent's Rel. TF is SERAC's sentiment edit success; "
    "its Rel. gen is the share of chat answers VADER reads as the target sentiment. "
    f"{BY_DESIGN}: a memory method's teacher-forced column (raw text never reaches it). "
    f"(n=K): the figure rests on K < {FEW_PROBES} probes. — : no such probes."
)


def _cell(summary: dict[str, Any], key: str) -> str:
    value = summary.get(key)
    if value is None:
        return "—"
    probes = summary.get(f"{key}_probes")
    few = f" (n={probes})" if probes is not None and probes < FEW_PROBES else ""
    return f"{value:.1f}{few}"


def table(
    rows: list[tuple[str, dict[str, Any] | None]],
    first: str = "",
    by_design: Collection[str] = (),
) -> str:
    """One row per (label, summary); columns are the metrics present in any row. Rows whose
    label is in `by_design` (memory methods) print their TF columns as n/a (by design)."""
    present = [(k, h) for k, h in COLUMNS if any(s and s.get(k) is not None for _, s in rows)]
    lines = [
        "| " + " | ".join([first, *(h for _, h in present)]) + " |",
        "|" + "---|" * (len(present) + 1),
    ]
    for label, summary in rows:
        cells = [
            BY_DESIGN
            if label in by_design and k.endswith("_tf") and (summary or {}).get(k) is not None
            else _cell(summary or {}, k)
            for k, _ in present
        ]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def run_markdown(result: dict[str, Any]) -> str:
    """The table of one `editserve eval` run, with the unedited model beside it."""
    title = (
        f"# {result['method']} on {result['format']} ({result['data']})\n\n"
        f"Model {result['model']}; {result['edits_applied']} edits applied of {result['n']} "
        f"records; {'sequential' if result['sequential'] else 'each edit undone before the next'}."
    )
    if result.get("records"):
        title += f" Records: {result['records']}."
    parts = [title]
    method = result["method"]
    memory = {method} if method in MEMORY_METHODS else set()
    if result.get("sequential"):
        rows = []
        for c in result["sequential"]:
            rows += [
                (f"{c['edits']} unedited", c["unedited"]),
                (f"{c['edits']} {method}", c["edited"]),
            ]
        marked = {f"{c['edits']} {method}" for c in result["sequential"]} if memory else set()
        parts.append(table(rows, "edits", marked))
    else:
        parts.append(
            table([("unedited", result["unedited"]), (method, result["edited"])], "", memory)
        )
        counts = result.get("probe_counts")
        if counts and any(counts["edited"].values()):
            sentiment = (
                "; Rel. target: read as that target sentiment; Rel. verbatim: containing the "
                "whole target response, per target"
                if "sentiment" in counts["edited"]
                else ""
            )
            cases = (
                "; Cases: records of chained edits counted whole, per record"
                if "cases" in counts["edited"]
                else ""
            )
            parts.append(
                "Chat answers per probe group, counted / probes (portability: right; "
                f"locality: unchanged; Leak: locality answers naming the target{sentiment}"
                f"{cases}):\n\n"
                + count_table(
                    [("unedited", counts["unedited"]), (result["method"], counts["edited"])]
                )
            )
        if result.get("refused"):
            parts.append(
                f"{len(result['refused'])} edits refused by the server (see results.json)."
            )
    parts.append(LEGEND)
    return "\n\n".join(parts) + "\n"


# Probe-count kinds in column order, with their column prefixes.
COUNT_KINDS = {
    "sentiment": "Rel. target",
    "verbatim": "Rel. verbatim",
    "portability": "Port.",
    "locality": "Loc.",
    "leak": "Leak",
    "cases": "Cases:",
}


def count_table(rows: list[tuple[str, dict[str, Any] | None]], first: str = "") -> str:
    """One row per (label, `add_counts` total); a column per probe group in any row, each
    cell "counted / probes" (portability: chat answers right; locality: answers unchanged;
    ConvSent's edit answers: read as the target sentiment, and containing the target response,
    per target; cases: records that chain several edits, counted whole)."""
    present = {
        (kind, key): None
        for kind in COUNT_KINDS
        for _, counts in rows
        for key in (counts or {}).get(kind, {})
    }
    heads = [f"{COUNT_KINDS[kind]} {key}" for kind, key in present]
    lines = ["| " + " | ".join([first, *heads]) + " |", "|" + "---|" * (len(heads) + 1)]
    for label, counts in rows:
        cells = []
        for kind, key in present:
            found = (counts or {}).get(kind, {}).get(key)
            cells.append("—" if found is None else f"{found[0]} / {found[1]}")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)
