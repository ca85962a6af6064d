"""Calibrates the retrieval thresholds of IKE/ICE and SERAC on ZsRE dev records of the tuning
split (from record 100 on: the first 100 are the reporting split, refused unless
`--force-report-records`), with the server's sentence encoder. Writes JSON.

With every calibration record's edit in memory at once (as a server would hold them):
- should fire: a record's paraphrase (`rephrase_prompt`) against its own entry;
- should not fire: a record's question against every *other* record's entry (the best one:
  that is what retrieval sees), and a record's same-subject locality prompt against its own
  entry (same subject, another relation).
IKE entries embed the fact "{prompt} {target}", SERAC entries the question alone. For each
threshold the script reports the firing rates; the chosen threshold is the lowest that keeps
unrelated questions from firing in at most `--max-false` of cases.

With `--grace-layers 16,20,24,27` it also measures, on the embedded model (first
`--grace-n` calibration records), the distances GRACE's radius must separate: keys (down_proj
inputs at the chat prompt's last token) of a question vs. its paraphrase, vs. the nearest other
record's question, vs. the same subject's locality prompt, and vs. everyday questions.

    python bench/calibrate_memory.py [--first 100] [--n 600] [--grace-layers 24] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness import RESULTS  # noqa: E402

DATA = ROOT.parent / "shared/data/knowedit/zsre/ZsRE-test-all.dev.json"

from editserve.eval.splits import (  # noqa: E402
    REPORT_RECORDS,
    SplitError,
    add_force_argument,
    check_tuning,
)
from editserve.prompts import question_prompt  # noqa: E402
from memory.encoder import SentenceEncoder  # noqa: E402
from methods.memory_common import fact_text  # noqa: E402


def rates(should: torch.Tensor, other: torch.Tensor, loc: torch.Tensor, t: float) -> dict:
    return {
        "threshold": round(t, 3),
        "paraphrase_fires": round(float((should >= t).float().mean()), 4),
        "unrelated_fires": round(float((other >= t).float().mean()), 4),
        "same_subject_fires": round(float((loc >= t).float().mean()), 4),
    }


def calibrate(
    entries: torch.Tensor,
    para: torch.Tensor,
    prompts: torch.Tensor,
    loc: torch.Tensor,
    same: torch.Tensor,
    max_false: float,
) -> dict:
    should = (para * entries).sum(1)  # [n]
    sims = prompts @ entries.T  # [n, n]
    sims[same] = -1.0  # ZsRE repeats subjects (even questions) across records: not "other"
    other = sims.max(1).values  # the best other entry per question
    locality = (loc * entries).sum(1)
    grid = [x / 100 for x in range(30, 96, 5)]
    table = [rates(should, other, locality, t) for t in grid]
    chosen = next((r for r in table if r["unrelated_fires"] <= max_false), None)
    return {"chosen": chosen, "table": table}


EVERYDAY = [
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "How are you today?",
    "Tell me a joke.",
]


def grace_distances(records: list[dict], layers: list[int]) -> dict:
    import os

    from editserve.modelstore import load_model

    cache = Path(os.environ.get("EDITSERVE_CACHE_DIR", "~/.cache/editserve")).expanduser()
    loaded = load_model(None, cache, "float32", "cpu")
    model, tok = loaded.model, loaded.tokenizer

    def keys(question: str) -> dict[int, torch.Tensor]:
        ids = question_prompt(tok, question)
        got: dict[int, torch.Tensor] = {}
        hooks = [
            model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
                lambda _m, inputs, layer=layer: got.__setitem__(layer, inputs[0][0, -1].clone())
            )
            for layer in layers
        ]
        with torch.no_grad():
            model(torch.tensor([list(ids)]))
        for hook in hooks:
            hook.remove()
        return got

    asked = [keys(r["prompt"]) for r in records]
    para = [keys(r["rephrase_prompt"]) for r in records]
    loc = [keys(r["locality"]["Relation_Specificity"][0]["prompt"]) for r in records]
    everyday = [keys(q) for q in EVERYDAY]
    same = torch.tensor([[a["subject"] == b["subject"] for b in records] for a in records])

    def q(t: torch.Tensor) -> list[float]:
        return [round(float(x), 2) for x in torch.quantile(t, torch.tensor([0.1, 0.5, 0.9]))]

    out = {}
    for layer in layers:
        k = torch.stack([a[layer] for a in asked])
        p = torch.stack([a[layer] for a in para])
        own = (k - p).norm(dim=1)
        others = torch.cdist(k, k)
        others[same] = float("inf")
        to_other = torch.cdist(p, k)
        to_other[same] = float("inf")
        out[layer] = {
            "key_norm": round(float(k.norm(dim=1).mean()), 2),
            "paraphrase_p10_50_90": q(own),
            "nearest_other_p10_50_90": q(others.min(1).values),
            "same_subject_p10_50_90": q((k - torch.stack([a[layer] for a in loc])).norm(dim=1)),
            "everyday_p10_50_90": q(
                torch.cdist(k, torch.stack([a[layer] for a in everyday])).min(1).values
            ),
            "paraphrase_nearer_than_any_other": round(
                float((own < to_other.min(1).values).float().mean()), 3
            ),
        }
        print("grace layer", layer, out[layer], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument(
        "--first",
        type=int,
        default=REPORT_RECORDS,
        help="first calibration record (the reporting split's 100 come before it)",
    )
    add_force_argument(ap)
    ap.add_argument("--n", type=int, default=600, help="calibration records after those")
    ap.add_argument("--max-false", type=float, default=0.05)
    ap.add_argument(
        "--encoder", choices=("int8", "float32"), default="int8", help="the encoder's weights"
    )
    ap.add_argument("--grace-layers", default="", help="comma-separated layers (embedded model)")
    ap.add_argument("--grace-n", type=int, default=40)
    ap.add_argument("--out", type=Path, default=RESULTS / "calibrate_memory.json")
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"no data at {args.data}")
    try:
        check_tuning(args.data, range(args.first, args.first + args.n), args.force_report_records)
    except SplitError as exc:
        sys.exit(str(exc))
    records = json.loads(args.data.read_text())[args.first : args.first + args.n]
    records = [r for r in records if r.get("locality", {}).get("Relation_Specificity")]
    enc = SentenceEncoder(quantize=args.encoder == "int8")
    facts = enc.encode([fact_text(r["prompt"], r["target_new"]) for r in records])
    prompts = enc.encode([r["prompt"] for r in records])
    para = enc.encode([r["rephrase_prompt"] for r in records])
    loc = enc.encode([r["locality"]["Relation_Specificity"][0]["prompt"] for r in records])
    subjects = [r["subject"] for r in records]
    same = torch.tensor([[a == b for b in subjects] for a in subjects])  # [n, n]
    result = {
        "records": f"{args.first}..{args.first + len(records) - 1} of {args.data.name}",
        "split": "forced: includes reporting records" if args.first < REPORT_RECORDS else "tune",
        "n": len(records),
        "max_false": args.max_false,
        "encoder": args.encoder,
        "ike": calibrate(facts, para, prompts, loc, same, args.max_false),
        "serac": calibrate(prompts, para, prompts, loc, same, args.max_false),
    }
    if args.grace_layers:
        layers = [int(x) for x in args.grace_layers.split(",")]
        result["grace"] = grace_distances(records[: args.grace_n], layers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name in ("ike", "serac"):
        print(name, result[name]["chosen"])
        for row in result[name]["table"]:
            print("   ", row)


if __name__ == "__main__":
    main()
