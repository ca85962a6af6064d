"""How far the ConvSent chat judge (VADER, `editserve.eval.metrics.judged_sentiment`) agrees with
ConvSent's own labels. Writes JSON.

Two readings, on the file the evaluation uses:
- every labelled response of every record (ConvSent's `pos` and `neg` lists): for each label, how
  many the judge reads as positive, negative or neutral;
- the edit targets of the first `--n` records as the evaluation draws them (same seed): how many
  the judge reads as their target sentiment. A method whose chat answer were exactly the target
  response would score this: a reference for the Rel. gen column, not a bound.

    python bench/convsent_judge.py [--n 100] [--seed 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

from harness import RESULTS

from editserve.eval.datasets import load
from editserve.eval.metrics import judged_sentiment

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/knowedit/convsent/blender_test.dev.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "convsent_judge.json")
    args = parser.parse_args()

    _, records = load(args.data, seed=args.seed)
    responses: dict[str, Counter[str]] = {"positive": Counter(), "negative": Counter()}
    for r in records:
        s = r.sentiment
        other = "negative" if s.target == "positive" else "positive"
        for label, texts in ((s.target, s.target_texts), (other, s.other_texts)):
            responses[label].update(judged_sentiment(t) for t in texts)

    targets: dict[str, Counter[str]] = {"positive": Counter(), "negative": Counter()}
    for r in records[: args.n]:
        targets[r.sentiment.target][judged_sentiment(r.requests[0]["target_new"])] += 1

    read_right = sum(targets[s][s] for s in targets)
    result = {
        "data": os.path.relpath(args.data, ROOT),
        "records": len(records),
        "labelled_responses_read_as": {k: dict(v) for k, v in responses.items()},
        "first_n": args.n,
        "targets_read_as": {k: dict(v) for k, v in targets.items()},
        "targets_read_as_their_sentiment": read_right,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
