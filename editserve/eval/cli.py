"""`editserve eval`: KnowEdit-style evaluation of one method on one data file, via the API."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from editserve.eval.measure import MeasureSettings
from editserve.eval.runner import CHECKPOINTS, ResumeError, RunConfig, evaluate
from editserve.eval.splits import REPORT_RECORDS, SPLITS, SplitError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate an editing method on a running server (KnowEdit metrics)",
        description="Applies each record's edit through POST /edits, scores it through the public "
        "API against the unedited model, and undoes it (or keeps it, with --sequential). "
        "Rerun the same command to resume an interrupted run.",
    )
    p.add_argument("--server", default=os.environ.get("EDITSERVE_SERVER", "http://127.0.0.1:8000"))
    p.add_argument("--method", required=True, help="rome, memit, alphaedit, ft, ike, ice, ...")
    p.add_argument(
        "--data", required=True, type=Path, help="a KnowEdit/CounterFact/ZsRE/MQuAKE file"
    )
    p.add_argument("--n", type=int, help="the first N records of the split (default: all)")
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="report",
        help=f"report: the first {REPORT_RECORDS} records of an evaluation file (what "
        f"docs/results.md reports; tune nothing on them); tune: its records from "
        f"{REPORT_RECORDS} on, or all of a training file (train_cf.json, "
        "trivia_qa_train.json, ...); all: every record (the 1,000-edit sequential curve)",
    )
    p.add_argument(
        "--sequential", action="store_true", help="keep every edit (scored at 1, 10, 100, 1000)"
    )
    p.add_argument("--checkpoints", default=",".join(map(str, CHECKPOINTS)))
    p.add_argument("--out", type=Path, help="output folder (default: eval-<method>-<data name>)")
    p.add_argument("--baseline", type=Path, help="unedited observations to share between methods")
    p.add_argument("--hparams", type=json.loads, help="JSON object of hyperparameter overrides")
    p.add_argument(
        "--scope",
        choices=["global", "question"],
        help="the edits' scope (default: the method's); question: only requests in scope",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--answer-tokens", type=int, default=24, help="judged chat answers: at least this long"
    )
    p.add_argument(
        "--answer-margin",
        type=int,
        default=8,
        help="judged chat answers get max(--answer-tokens, target tokens + this); "
        "-1: always --answer-tokens (as runs before sized answers)",
    )
    p.add_argument("--locality-tokens", type=int, default=16)
    p.add_argument("--fluency-tokens", type=int, default=100, help="0: skip fluency")
    p.add_argument("--max-probes", type=int, help="cap on prompts per portability/locality group")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument(
        "--records-in-flight",
        type=int,
        default=8,
        help="records observed at once (unedited, and at checkpoints)",
    )
    p.add_argument("--cleanup", action="store_true", help="sequential: undo the edits at the end")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--api-key", default=os.environ.get("EDITSERVE_API_KEY"))
    p.add_argument("--admin-key", default=os.environ.get("EDITSERVE_ADMIN_KEY"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the bar
    out = args.out or Path(f"eval-{args.method}-{args.data.stem}")
    cfg = RunConfig(
        server=args.server,
        method=args.method,
        data=args.data,
        out=out,
        n=args.n,
        split=args.split,
        sequential=args.sequential,
        hparams=args.hparams,
        scope=args.scope,
        settings=MeasureSettings(
            answer_tokens=args.answer_tokens,
            answer_margin=None if args.answer_margin < 0 else args.answer_margin,
            locality_tokens=args.locality_tokens,
            fluency_tokens=args.fluency_tokens,
            seed=args.seed,
        ),
        max_probes=args.max_probes,
        checkpoints=tuple(int(c) for c in args.checkpoints.split(",") if c),
        baseline=args.baseline,
        api_key=args.api_key,
        admin_key=args.admin_key,
        concurrency=args.concurrency,
        records_in_flight=args.records_in_flight,
        cleanup=args.cleanup,
        progress=not args.no_progress,
    )
    try:
        asyncio.run(evaluate(cfg))
    except (ResumeError, SplitError) as exc:
        print(f"editserve eval: {exc}", file=sys.stderr)
        return 2
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0
