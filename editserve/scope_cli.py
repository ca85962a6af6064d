"""`editserve train-scope`: trains SERAC's scope classifier (memory/scope.py) on edit datasets.

Records come from any file `editserve eval` reads; a record with one edit request and at least
one paraphrase is an example (its question, paraphrases and locality prompts). The first
`--skip` records are left out (by default an evaluation file's reporting split, its first 100,
which nothing may be tuned on; a training file is read whole), the next `--calibrate` are held
out to choose the threshold and to compare with the cosine classifier, the rest train.
Serve the result with `serac_scope: PATH` (EDITSERVE_SERAC_SCOPE).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from editserve.config import Settings
from editserve.eval.datasets import EvalRecord, load
from editserve.eval.splits import REPORT_RECORDS, add_force_argument, check_tuning, is_train_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-scope",
        help="train SERAC's scope classifier on edit datasets",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--data", required=True, type=Path, action="append", help="repeatable")
    p.add_argument("--out", required=True, type=Path, help="the classifier (.safetensors)")
    p.add_argument(
        "--skip",
        type=int,
        help=f"records of each file left out first (default: {REPORT_RECORDS}, the reporting "
        "split, for an evaluation file; 0 for a training file)",
    )
    add_force_argument(p)
    p.add_argument(
        "--calibrate",
        type=int,
        help="records of the first file held out for the threshold (default: a fifth)",
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, help="use this threshold instead of calibrating")
    p.add_argument("--report", type=Path, help="write the calibration tables as JSON")
    p.set_defaults(run=run)


def example(record: EvalRecord):  # noqa: ANN201 (ScopeExample | None; memory imported lazily)
    from memory.scope import ScopeExample

    if len(record.requests) != 1 or not record.generalization:
        return None
    request = record.requests[0]
    return ScopeExample(
        question=request["prompt"],
        paraphrases=tuple(p.prompt for p in record.generalization),
        outside=tuple(p.prompt for group in record.locality.values() for p in group),
        subject=request.get("subject", ""),
    )


def run(args: argparse.Namespace) -> int:
    from memory.encoder import SentenceEncoder
    from memory.scope import EmbeddedExamples, calibrate, classifier_scores, cosine_scores, train

    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise ValueError(f"--threshold is a probability in (0, 1), not {args.threshold}")
    held, fitted, skips = [], [], []
    for i, path in enumerate(args.data):
        _, records = load(path)
        skip = args.skip if args.skip is not None else 0 if is_train_file(path) else REPORT_RECORDS
        # The classifier and its threshold are settings: refuse the reporting records.
        check_tuning(path, range(skip, len(records)), args.force_report_records)
        examples = [e for r in records[skip:] if (e := example(r))]
        skips.append(skip)
        if i == 0:
            n = len(examples) // 5 if args.calibrate is None else args.calibrate
            held, examples = examples[:n], examples[n:]
        fitted += examples
        print(f"{path}: {len(examples)} training examples", file=sys.stderr)
    if len(held) < 10 or len(fitted) < 10:
        raise ValueError(
            f"too few usable records ({len(held)} to calibrate, {len(fitted)} to train; a record "
            "needs one edit request and a paraphrase)"
        )
    # The encoder files the server loads (EDITSERVE_MEMORY_ENCODER_DIR, else the package's).
    encoder = SentenceEncoder(Settings().memory_encoder_dir)
    classifier = train(EmbeddedExamples.embed(encoder, fitted), epochs=args.epochs, seed=args.seed)
    held_out = EmbeddedExamples.embed(encoder, held)
    chosen, table = calibrate(classifier_scores(classifier, held_out))
    classifier.threshold = chosen if args.threshold is None else args.threshold
    _, cosine_table = calibrate(cosine_scores(held_out))
    report = {
        "data": [str(p) for p in args.data],
        "skip": skips[0] if len(set(skips)) == 1 else skips,
        "trained_on": len(fitted),
        "calibrated_on": len(held),
        "threshold": classifier.threshold,
        "classifier": table,
        "cosine": cosine_table,
    }
    classifier.info = {k: report[k] for k in ("data", "skip", "trained_on", "calibrated_on")}
    classifier.info["encoder"] = "float32"  # the embeddings it saw (the server may use int8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    classifier.save(args.out)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    print(f"held-out records ({len(held)}): share that fires, by threshold")
    for name, rows in (("classifier", table), ("cosine (the default classifier)", cosine_table)):
        print(f"{name}: threshold  paraphrase  other question  outside")
        for row in rows:
            cells = (row["paraphrase_fires"], row["other_question_fires"], row["outside_fires"])
            print(f"  {row['threshold']:.2f}  " + "  ".join(f"{c:.3f}" for c in cells))
    print(f"wrote {args.out} (threshold {classifier.threshold})")
    return 0
