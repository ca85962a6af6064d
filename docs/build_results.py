"""Generates docs/results.md: `editserve eval` of every method on every dataset, and the
sequential curve, on the embedded model, each table with the unedited model beside it.

    python docs/build_results.py                      # the full grid (many hours on a CPU)
    python docs/build_results.py --n 10 --methods rome,ike --datasets zsre --seq-methods rome

It starts its own servers (fresh journals kept under --work), runs each evaluation into its own
folder there, and renders the Markdown from whatever those folders hold. Interrupted, it resumes:
rerun the same command (finished runs are read back, unfinished ones continue, and a sequential
run's server restarts on its own journal, so its edits are back). `--render-only` only renders.

The grid reads each file's reporting split (its first 100 records: editserve.eval.splits); the
sequential curves need 1,000 records, so they read `--split all` and say so. Every figure is
scored again from the stored observations when rendering, so new readings (the target leak,
bare answers) appear for runs made before them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from editserve.eval import datasets, report
from editserve.eval.measure import MeasureSettings
from editserve.eval.report import MEMORY_METHODS
from editserve.eval.runner import CHECKPOINTS, RunConfig, evaluate
from editserve.eval.scoring import add_counts, probe_counts, score, summarise
from editserve.eval.store import JsonLines

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "bench"))
from harness import RESULTS, ServerProcess, machine_info  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DATASETS = {
    "zsre": "knowedit/zsre/ZsRE-test-all.dev.json",
    "wiki_recent": "knowedit/wiki_recent/recent_train.dev.json",
    "wiki_counterfact": "knowedit/wiki_counterfact/test_cf.dev.json",
    "wikibio": "knowedit/wikibio/wikibio-test-all.dev.json",
    "convsent": "knowedit/convsent/blender_test.dev.json",
    "sanitation": "knowedit/sanitation/trivia_qa_test.dev.json",
    "counterfact": "counterfact/rome_format/counterfact_portability_gpt4.dev.json",
    "zsre_mend": "zsre_mend_format/zsre_mend_eval_portability_gpt4.dev.json",
    "mquake": "mquake/MQuAKE-hard.dev.json",
}
METHODS = "rome,memit,alphaedit,ft,ike,ice,serac,grace"
SEQ_METHODS = "rome,memit,alphaedit,grace"


def settings(args: argparse.Namespace) -> MeasureSettings:
    return MeasureSettings(fluency_tokens=args.fluency_tokens, seed=args.seed)


def run_config(args: argparse.Namespace, url: str, method: str, name: str, **kw: Any) -> RunConfig:
    folder = args.work / ("sequential" if kw.get("sequential") else name) / method
    # The grid reports the first 100 records; 1,000 sequential edits cannot stay inside them.
    kw.setdefault("split", "all" if kw.get("sequential") else "report")
    return RunConfig(
        server=url,
        method=method,
        data=SHARED / DATASETS[name],
        out=folder,
        baseline=args.work / name / "baseline.jsonl",
        settings=settings(args),
        max_probes=args.max_probes,
        **kw,
    )


def run_all(args: argparse.Namespace) -> None:
    names = [d for d in args.datasets.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    if names and methods:
        server = ServerProcess(None, None, env={"EDITSERVE_STATE_DIR": str(args.work / "state")})
        server.wait_ready()
        try:
            for name in names:
                for method in methods:
                    print(f"== {method} on {name} (n={args.n})", flush=True)
                    # The grid's server holds no edit between runs: one left by an interrupted
                    # run would sit under every later method's measurements.
                    cfg = run_config(
                        args, server.url, method, name, n=args.n, require_unedited=True
                    )
                    asyncio.run(evaluate(cfg))
        finally:
            server.stop()
    for method in [m for m in args.seq_methods.split(",") if m]:
        # One journal per sequence: its edits stay on that model, and come back on a restart.
        state = args.work / f"state-sequential-{method}"
        server = ServerProcess(None, None, env={"EDITSERVE_STATE_DIR": str(state)})
        server.wait_ready()
        try:
            print(f"== {method} sequential to {args.seq_n} edits on zsre", flush=True)
            cfg = run_config(
                args,
                server.url,
                method,
                "zsre",
                n=args.seq_n,
                sequential=True,
                checkpoints=CHECKPOINTS,
            )
            asyncio.run(evaluate(cfg))
        finally:
            server.stop()


# -- rendering -------------------------------------------------------------------------------------


def unedited(args: argparse.Namespace, name: str, n: int) -> dict[str, Any] | None:
    """The unedited model's figures on the first n records, from the shared observations."""
    path = args.work / name / "baseline.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    observed = {r["index"]: r["observed"] for r in rows}
    _, records = datasets.load(SHARED / DATASETS[name], n, args.seed, args.max_probes)
    scored = [
        score(r, observed[r.index], observed[r.index]) for r in records if r.index in observed
    ]
    return summarise(scored) if scored else None


def observed(path: Path) -> dict[int, dict[str, Any]]:
    """Observations per record index from a baseline.jsonl or records.jsonl (refusals have none)."""
    return {r["index"]: r["observed"] for r in JsonLines(path).read() if "observed" in r}


def edited(args: argparse.Namespace, name: str, method: str, n: int, fallback: Any) -> Any:
    """A method's figures on the first n records, scored again from its stored observations
    (so readings added since the run, such as the target leak, are there); else its stored
    summary."""
    post = observed(args.work / name / method / "records.jsonl")
    pre = observed(args.work / name / "baseline.jsonl")
    _, records = datasets.load(SHARED / DATASETS[name], n, args.seed, args.max_probes)
    scored = [
        score(r, post[r.index], pre[r.index]) for r in records if r.index in post and r.index in pre
    ]
    return summarise(scored) if scored else fallback


def rescored(args: argparse.Namespace, method: str, checkpoints: list[dict]) -> list[dict]:
    """Sequential checkpoints scored again from their stored observations (checkpoint-K.jsonl)
    where those are kept; a checkpoint without them keeps its stored summaries."""
    folder = args.work / "sequential" / method
    pre = observed(args.work / "zsre" / "baseline.jsonl")
    parts = {c["edits"]: observed(folder / f"checkpoint-{c['edits']}.jsonl") for c in checkpoints}
    most = max((max(p, default=-1) for p in parts.values()), default=-1) + 1
    _, records = datasets.load(SHARED / DATASETS["zsre"], most, args.seed, args.max_probes)
    out = []
    for c in checkpoints:
        post = parts[c["edits"]]
        kept = [r for r in records if r.index in post and r.index in pre]
        if not kept:
            out.append(c)
            continue
        out.append(
            {
                **c,
                "edited": summarise([score(r, post[r.index], pre[r.index]) for r in kept]),
                "unedited": summarise([score(r, pre[r.index], pre[r.index]) for r in kept]),
            }
        )
    return out


def fixed_answers(folder: Path) -> bool:
    """Whether a run generated its judged answers at one fixed length (before answers were
    sized to their targets): its run.json has no answer_margin."""
    path = folder / "run.json"
    if not path.is_file():
        return False
    return "answer_margin" not in json.loads(path.read_text())["identity"]["settings"]


def group_counts(
    args: argparse.Namespace, name: str, n: int, methods: list[str]
) -> list[tuple[str, dict[str, Any]]]:
    """Chat answers per probe group (`probe_counts`): the unedited model, then each method."""
    _, records = datasets.load(SHARED / DATASETS[name], n, args.seed, args.max_probes)
    pre = observed(args.work / name / "baseline.jsonl")
    rows = [("unedited", pre)] + [
        (m, observed(args.work / name / m / "records.jsonl")) for m in methods
    ]
    return [
        (
            label,
            add_counts(
                [
                    probe_counts(r, post[r.index], pre[r.index])
                    for r in records
                    if r.index in post and r.index in pre
                ]
            ),
        )
        for label, post in rows
    ]


def results(folder: Path) -> dict[str, Any] | None:
    path = folder / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def sequence_so_far(folder: Path) -> tuple[int, list[dict[str, Any]]] | None:
    """An unfinished sequential run: the edits it made and the checkpoints it has scored."""
    events = JsonLines(folder / "sequence.jsonl").read()  # skips a line a crash cut short
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    made = sum(e["event"] == "edit" for e in events)
    return (made, checkpoints) if checkpoints else None


def checkpoint_table(method: str, checkpoints: list[dict[str, Any]]) -> str:
    rows = checkpoint_rows(method, checkpoints)
    memory = {label for label, _ in rows if method in MEMORY_METHODS and "unedited" not in label}
    return report.table(rows, "edits", memory)


def checkpoint_rows(method: str, checkpoints: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    rows = []
    for c in checkpoints:
        rows += [
            (f"{c['edits']}: unedited", c["unedited"]),
            (f"{c['edits']}: {method}", c["edited"]),
        ]
    return rows


def file_size(args: argparse.Namespace, name: str) -> int:
    """Records in a dataset file: a run of all of a short file (Sanitation has 64) is no slice."""
    return len(datasets.load(SHARED / DATASETS[name], None, args.seed, args.max_probes)[1])


def render(args: argparse.Namespace) -> str:
    saved = args.work / "command.txt"
    runs = dict.fromkeys(saved.read_text().splitlines()) if saved.is_file() else {}
    parts = [
        "# Results: KnowEdit-style evaluation on the embedded model\n",
        "Generated by `python docs/build_results.py`, which runs the whole grid below and resumes "
        "where it stopped; the slices run into results/eval so far, in order:\n\n"
        + "".join(f"- `{line}`\n" for line in runs),
        f"Rendered on {time.strftime('%Y-%m-%d')} "
        f"({platform.machine()}, {machine_info()['cpus_usable']} usable CPUs). Model: "
        "SmolLM2-135M-Instruct (embedded), default hyperparameters of every method. "
        "Each figure is a mean ×100 over the records named; `n` is the number of records whose "
        "edit the server applied. How each metric is measured, and where it departs from "
        "KnowEdit: [docs/eval.md](eval.md).\n",
        report.LEGEND + "\n",
        "IKE, ICE and SERAC condition chat prompts only, so their TF columns (raw-text "
        "/v1/completions) equal the unedited model's by design; their gen columns are their "
        "measure. GRACE's codebook acts on both, but fires only on a key within an entry's "
        "radius, and its keys are taken at the chat template's last token: raw prompts' keys "
        "stay outside (its TF columns equal the unedited model's too). The tables print "
        "those columns as n/a (by design).\n",
    ]
    legacy = sorted(
        {
            f"{name}/{m}"
            for name in DATASETS
            for m in METHODS.split(",")
            if fixed_answers(args.work / name / m)
        }
        | {
            f"sequential/{m}"
            for m in SEQ_METHODS.split(",")
            if fixed_answers(args.work / "sequential" / m)
        }
    )
    if legacy:
        parts.append(
            "**Answer length.** Every run below generated its judged chat answers at a fixed 24 "
            "tokens, before answers were sized to their targets (max(24, target tokens + 8), "
            "`editserve eval --answer-margin`): a target longer than ~24 tokens could not be "
            "said whole (63 of WikiBio's 100), so those success figures are capped and must be "
            f're-run ({len(legacy)} runs; docs/eval.md, "Splits", gives the commands). The '
            "target leak and bare-answer columns are scored from the stored answers, so they "
            "are exact for these runs; the grid's records are each file's reporting split "
            "(its first 100), the sequential curves records 0-999 (`--split all`).\n"
        )
    missing = []
    for name in DATASETS:
        found = [
            (m, r) for m in METHODS.split(",") if (r := results(args.work / name / m)) is not None
        ]
        if not found:
            missing.append(name)
            continue
        n = max(r["n"] for _, r in found)
        rows = [(f"unedited (n={n})", unedited(args, name, n))]
        labels = {
            m: f"{m} (n={r['edits_applied']}){' †' if r.get('preexisting_edits') else ''}"
            for m, r in found
        }
        rows += [(labels[m], edited(args, name, m, r["n"], r["edited"])) for m, r in found]
        memory = {labels[m] for m, _ in found if m in MEMORY_METHODS}
        parts.append(f"## {name}: `{DATASETS[name]}`, first {n} records (reporting split)\n")
        parts.append(report.table(rows, "method", memory) + "\n")
        counts = group_counts(args, name, n, [m for m, _ in found])
        if any(any(c.values()) for _, c in counts):
            sentiment = any(c.get("sentiment") for _, c in counts)
            cases = any(c.get("cases") for _, c in counts)
            parts.append(
                "Chat answers per probe group, counted / probes: portability answers that "
                "contain an accepted answer, locality answers left word for word unchanged, "
                "locality answers that name the edit's target (Leak; the unedited row: the "
                "unedited model's answers to the same probes)"
                + (
                    ", edit answers that VADER reads as the target sentiment (Rel. target) and "
                    "that contain the whole target response (Rel. verbatim), per target"
                    if sentiment
                    else ""
                )
                + (
                    "; and, counted / records, each record of chained edits read whole as "
                    "MQuAKE reads it: every edit's answer came back (all edits recalled), and "
                    "any of its multi-hop questions answered right (Multi_Hop any)"
                    if cases
                    else ""
                )
                + ".\n"
            )
            parts.append(report.count_table(counts, "method") + "\n")
        if any(r.get("preexisting_edits") for _, r in found):
            parts.append(
                "† measured while an edit left by an interrupted run was still applied on the "
                "server (named in its run.json as preexisting): the unedited row is the true "
                "unedited model's, and this row is not a clean measurement; to be run again.\n"
            )
        absent = [m for m in METHODS.split(",") if m not in dict(found)]
        if absent:
            parts.append(f"Not run on {name}: {', '.join(absent)}.\n")
    seq = [(m, r) for m in SEQ_METHODS.split(",") if (r := results(args.work / "sequential" / m))]
    unfinished = [
        (m, log)
        for m in SEQ_METHODS.split(",")
        if m not in dict(seq) and (log := sequence_so_far(args.work / "sequential" / m))
    ]
    if seq or unfinished:
        parts.append("## Sequential editing on zsre: every edit so far, scored after k edits\n")
    for method, r in seq:
        parts.append(f"### {method} ({r['n']} edits in sequence, records 0-{r['n'] - 1})\n")
        parts.append(checkpoint_table(method, rescored(args, method, r["sequential"])) + "\n")
    for method, (made, checkpoints) in unfinished:
        parts.append(
            f"### {method} (unfinished: {made} edits made so far; the checkpoints taken are "
            "below, and rerunning the command resumes the run)\n"
        )
        parts.append(checkpoint_table(method, rescored(args, method, checkpoints)) + "\n")
    absent = [m for m in SEQ_METHODS.split(",") if m not in dict(seq) and m not in dict(unfinished)]
    not_run = [f"datasets with no run: {', '.join(missing)}"] if missing else []
    if absent:
        not_run.append(f"sequential curves not run: {', '.join(absent)}")
    small = []
    for name in DATASETS:
        found = (results(args.work / name / m) for m in METHODS.split(","))
        short = [r for r in found if r and r["n"] < 100]
        if short:  # the file is read only here, once, for a dataset with a short run
            size = file_size(args, name)
            small += [f"{name} n={r['n']}" for r in short if r["n"] < size]
    small += [f"{m} sequential to {r['n']}" for m, r in seq if r["n"] < 1000]
    if small:
        not_run.append(
            "the full sizes: this is a slice (" + ", ".join(dict.fromkeys(small)) + "); "
            "`python docs/build_results.py` with no options runs 100 records of every file with "
            "every method and the sequential curves to 1,000 edits"
        )
    if not_run:
        parts.append("## Not run\n\n" + "".join(f"- {line}\n" for line in not_run))
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="records per dataset")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seq-methods", default=SEQ_METHODS)
    parser.add_argument("--seq-n", type=int, default=1000)
    parser.add_argument("--fluency-tokens", type=int, default=100)
    parser.add_argument("--max-probes", type=int, default=5, help="per portability/locality group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=RESULTS / "eval")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"no benchmark data at {SHARED} (../shared/data is needed)")
    if not args.render_only:
        args.work.mkdir(parents=True, exist_ok=True)
        with (args.work / "command.txt").open("a") as f:
            f.write(shlex.join(["python", "docs/build_results.py", *sys.argv[1:]]) + "\n")
        run_all(args)
    args.out.write_text(render(args))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
