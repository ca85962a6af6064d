"""Apply and undo cost of the weight ledger, in process, with 1, 100 and 1,000 active edits on one
matrix of the embedded model's down_proj shape (576 x 1536, float32), rank-one deltas as ROME's.

With k edits active, each round times an apply (a new delta, the newest) and three undos: of that
newest delta (it sits in the last chunk: one chunk is folded onto the checkpoint), of a delta at a
random position, and of the oldest (every chunk is folded again from the pristine copy: the worst
case). Each undone delta is applied again, so k stays the same. The goal is an undo of at most
20 ms. The weights are checked to be pristine again, bit for bit, once every edit is undone.

    python bench/ledger_undo.py [--active 1,100,1000] [--rounds 100] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))

from harness import RESULTS, machine_info, percentile, write_report  # noqa: E402

from editserve.edits.ledger import CHUNK, WeightLedger  # noqa: E402
from methods.base import ParamDelta  # noqa: E402

SHAPE = (576, 1536)
NAME = "weight"
GOAL_MS = 20.0


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {"p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--active", default="1,100,1000", help="active edits, comma-separated")
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds per count")
    parser.add_argument("--out", type=Path, default=RESULTS / "ledger_undo.json")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = round(os.getloadavg()[0], 2)
    g = torch.Generator().manual_seed(0)
    pick = random.Random(0)

    def rank_one() -> ParamDelta:
        u = torch.randn(SHAPE[0], 1, generator=g)
        v = torch.randn(1, SHAPE[1], generator=g) * 1e-3
        return ParamDelta(low_rank={NAME: (u, v)})

    model = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    pristine = model.weight.detach().clone()
    ledger = WeightLedger(model)
    active: list[str] = []  # oldest first, as the ledger orders them
    made = 0

    def apply(delta: ParamDelta, edit_id: str) -> float:
        t = time.perf_counter()
        ledger.apply(edit_id, delta)
        took = time.perf_counter() - t
        active.append(edit_id)
        return took

    def undo(position: int) -> tuple[float, str, ParamDelta]:
        edit_id = active.pop(position)
        t = time.perf_counter()
        delta = ledger.revert(edit_id)
        return time.perf_counter() - t, edit_id, delta

    rows: list[dict[str, Any]] = []
    for k in sorted(int(x) for x in args.active.split(",")):
        while len(active) < k:
            apply(rank_one(), f"e{made}")
            made += 1
        times: dict[str, list[float]] = {
            "apply": [],
            "undo_newest": [],
            "undo_random": [],
            "undo_oldest": [],
        }
        for _ in range(3):  # warm-up: allocator, BLAS threads
            apply(rank_one(), f"e{made}")
            made += 1
            undo(len(active) - 1)
        for _ in range(args.rounds):
            times["apply"].append(apply(rank_one(), f"e{made}"))
            made += 1
            took, edit_id, delta = undo(len(active) - 1)
            times["undo_newest"].append(took)
            for kind, position in (
                ("undo_random", pick.randrange(len(active))),
                ("undo_oldest", 0),
            ):
                took, edit_id, delta = undo(position)
                times[kind].append(took)
                apply(delta, edit_id)  # back, as the newest
        row: dict[str, Any] = {"active_edits": k, "rounds": args.rounds}
        row.update({kind: summary(ts) for kind, ts in times.items()})
        row["held_mb"] = round(ledger.held_bytes() / 2**20, 2)
        rows.append(row)
        print(
            f"{k:5d} active: apply p50 {row['apply']['p50_ms']} ms p99 {row['apply']['p99_ms']};"
            f" undo newest p50 {row['undo_newest']['p50_ms']} p99 {row['undo_newest']['p99_ms']};"
            f" random p50 {row['undo_random']['p50_ms']} p99 {row['undo_random']['p99_ms']};"
            f" oldest p50 {row['undo_oldest']['p50_ms']} p99 {row['undo_oldest']['p99_ms']};"
            f" held {row['held_mb']} MB",
            flush=True,
        )
    for edit_id in reversed(active):
        ledger.revert(edit_id)
    exact = torch.equal(model.weight.detach(), pristine) and ledger.tracked() == []
    worst_p50 = max(r["undo_oldest"]["p50_ms"] for r in rows)
    report = {
        "shape": list(SHAPE),
        "dtype": "float32",
        "delta_rank": 1,
        "chunk": CHUNK,
        "goal_undo_ms": GOAL_MS,
        "worst_undo_p50_ms": worst_p50,
        "meets_goal_at_p50": worst_p50 <= GOAL_MS,
        "pristine_after_undoing_all": exact,
        "machine": machine_info(),
        # other processes' load on a shared CPU slows the matmuls: read the figures with it
        "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "rows": rows,
    }
    write_report(args.out, report)
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
