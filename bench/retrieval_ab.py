"""Retrieval inside a live server, per sentence-encoder variant, A/B on one server. Writes JSON.

Builds the server in-process (the embedded model, a fresh state folder), registers one IKE edit,
then sends 1-token chat requests whose question no edit matches, swapping the memory's encoder
between variants request by request (so each sees the same load on a shared CPU). Times
`MemoryEdits.retrieve` (embed + two searches + entry dicts: the work the chat route adds) and
the whole request.

    python bench/retrieval_ab.py [--rounds 150] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))

from encoder_latency import VARIANTS  # noqa: E402
from harness import RESULTS, machine_info, percentile  # noqa: E402

WARM_UP = 5
FACT = {"prompt": "Who founded Zorvel Works?", "subject": "Zorvel Works", "target_new": "Kra Smith"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=150, help="chat requests per variant")
    ap.add_argument(
        "--variants", default="before_eager_fp32,traced_fp32_1thread,traced_int8_1thread"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "retrieval_ab.json")
    args = ap.parse_args()
    from fastapi.testclient import TestClient

    from editserve.cli import build_server
    from editserve.config import Settings
    from memory.encoder import SentenceEncoder

    app = build_server(Settings(state_dir=Path(tempfile.mkdtemp(prefix="retrieval-ab-"))))
    memory = app.state.editserve.edits.memory
    names = args.variants.split(",")
    encoders = {n: SentenceEncoder(**VARIANTS[n]) for n in names}
    for enc in encoders.values():
        enc.load()
    retrieve_ms: dict[str, list[float]] = {n: [] for n in names}
    chat_ms: dict[str, list[float]] = {n: [] for n in names}
    current = [names[0]]
    real_retrieve = memory.retrieve

    def timed_retrieve(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        out = real_retrieve(*a, **k)
        retrieve_ms[current[0]].append((time.perf_counter() - t) * 1000)
        return out

    memory.retrieve = timed_retrieve
    with TestClient(app) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        body = {"method": "ike", "checks": False, "requests": [FACT]}
        client.post("/edits", json=body).raise_for_status()
        for i in range(WARM_UP + args.rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                current[0], memory.encoder = name, encoders[name]
                t = time.perf_counter()
                r = client.post(
                    "/v1/chat/completions",
                    json={
                        "model": model,
                        "messages": [{"role": "user", "content": f"What do bees make? ({i})"}],
                        "max_tokens": 1,
                        "temperature": 0,
                    },
                )
                r.raise_for_status()
                chat_ms[name].append((time.perf_counter() - t) * 1000)

    def summary(ms: list[float]) -> dict[str, float]:
        ms = ms[WARM_UP:]
        return {"p50_ms": round(statistics.median(ms), 2), "p90_ms": round(percentile(ms, 90), 2)}

    report = {
        "machine": machine_info(),
        "rounds": args.rounds,
        "variants": {n: VARIANTS[n] for n in names},
        "retrieve": {n: summary(v) for n, v in retrieve_ms.items()},
        "chat_1_token": {n: summary(v) for n, v in chat_ms.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("retrieve", "chat_1_token")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
