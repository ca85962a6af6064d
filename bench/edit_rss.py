"""Resident memory and edit time across sequential weight edits, against a baseline source tree.

A server gets `--n` ZsRE edits in sequence through POST /edits (checks off, as the evaluation
makes them). After each edit the server process's resident memory (VmRSS) is read, and the
edit's own timings kept. Then the server is restarted on its journal and the time until it
answers /health is taken (the replay of every edit). With `--baseline-src DIR` (e.g. `git archive`
of an older commit) the same runs on a server from that tree first, so both are one run:

    git archive 37bf154 | tar -x -C /tmp/editserve-base
    python bench/edit_rss.py --n 60 --baseline-src /tmp/editserve-base

Part two times the weight ledger alone, in process: five 576x1536 matrices (the embedded model's
MEMIT layers), k rank-one deltas active, then one more applied, and that one undone (an undo
recomposes from the pristine weights and every active delta).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from harness import RESULTS, ServerProcess, machine_info

from editserve.edits.ledger import WeightLedger
from editserve.heap import resident_mb
from methods.base import ParamDelta

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "knowedit" / "zsre"
ZSRE = DATA / "ZsRE-test-all.dev.json"


def start(env: dict[str, str], state: str) -> tuple[ServerProcess, float]:
    cwd = Path(env["PYTHONPATH"]) if "PYTHONPATH" in env else None
    t = time.monotonic()
    server = ServerProcess(None, None, env={"EDITSERVE_STATE_DIR": state, **env}, cwd=cwd)
    server.wait_ready()
    return server, time.monotonic() - t


def sequential_edits(env: dict[str, str], method: str, records: list[dict]) -> dict[str, Any]:
    state = tempfile.mkdtemp(prefix="editserve-bench-state-")
    server, _ = start(env, state)
    rows = []
    try:
        start_rss = resident_mb(server.proc.pid)
        with httpx.Client(base_url=server.url, timeout=900) as client:
            for i, r in enumerate(records):
                request = {k: r[k] for k in ("prompt", "subject", "target_new")}
                body = {"method": method, "requests": [request], "checks": False}
                resp = client.post("/edits", json=body)
                resp.raise_for_status()
                timings = resp.json()["timings"]
                rows.append(
                    {
                        "edits": i + 1,
                        "rss_mb": round(resident_mb(server.proc.pid), 1),
                        "compute_s": round(timings["compute_s"], 3),
                        "apply_s": round(timings["apply_s"], 4),
                    }
                )
                print(f"  {i + 1:4d} edits  rss {rows[-1]['rss_mb']:8.1f} MB", flush=True)
    finally:
        server.stop()
    replayed, restart_s = start(env, state)
    replayed.stop()
    return {
        "rss_at_start_mb": round(start_rss, 1),
        "rss_growth_mb_per_edit": round(
            (rows[-1]["rss_mb"] - rows[0]["rss_mb"]) / (len(rows) - 1), 2
        )
        if len(rows) > 1
        else None,
        "compute_s_median": round(statistics.median(r["compute_s"] for r in rows), 3),
        "restart_with_replay_s": round(restart_s, 2),
        "per_edit": rows,
    }


def ledger_costs(active: list[int], repeats: int = 3) -> list[dict[str, float]]:
    shape, layers = (576, 1536), 5
    model = torch.nn.ModuleList(
        torch.nn.Linear(shape[1], shape[0], bias=False) for _ in range(layers)
    )
    names = [f"{i}.weight" for i in range(layers)]
    g = torch.Generator().manual_seed(0)

    def rank_one() -> ParamDelta:
        return ParamDelta(
            low_rank={
                n: (torch.randn(shape[0], 1, generator=g), torch.randn(1, shape[1], generator=g))
                for n in names
            }
        )

    ledger, made, out = WeightLedger(model), 0, []
    for k in sorted(active):
        while made < k:
            ledger.apply(f"e{made}", rank_one())
            made += 1
        apply_s, undo_s = [], []
        for _ in range(repeats):
            delta = rank_one()
            t = time.perf_counter()
            ledger.apply("probe", delta)
            apply_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            ledger.revert("probe")
            undo_s.append(time.perf_counter() - t)
        out.append(
            {
                "active_edits": k,
                "apply_s": round(min(apply_s), 5),
                "undo_s": round(min(undo_s), 5),
            }
        )
        print(f"  ledger, {k:5d} active: apply {out[-1]['apply_s']} s, undo {out[-1]['undo_s']} s")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="sequential edits per server")
    parser.add_argument("--method", default="memit")
    parser.add_argument("--baseline-src", type=Path, help="source tree of the baseline server")
    parser.add_argument("--ledger-active", default="1,100,1000")
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "edit_rss.json"
    )
    args = parser.parse_args()
    if not ZSRE.is_file():
        raise SystemExit(f"no ZsRE file at {ZSRE} (../shared/data is needed)")
    records = json.loads(ZSRE.read_text())[: args.n]
    sources: dict[str, dict[str, str]] = {}
    if args.baseline_src:
        sources["baseline"] = {"PYTHONPATH": str(args.baseline_src.resolve())}
    sources["this"] = {}
    servers = {}
    for name, env in sources.items():
        print(f"{name}: {args.n} sequential {args.method} edits", flush=True)
        servers[name] = sequential_edits(env, args.method, records)
    print("weight ledger in process", flush=True)
    ledger = ledger_costs([int(k) for k in args.ledger_active.split(",")])
    result = {
        "machine": machine_info(),
        "method": args.method,
        "n": args.n,
        "baseline_src": str(args.baseline_src) if args.baseline_src else None,
        "servers": servers,
        "ledger": ledger,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
