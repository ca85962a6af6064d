"""Microbenchmark of the retrieval query path: the sentence encoder's embedding of one chat
message, per encoder variant, and the FAISS search that follows it. Writes JSON.

Variants are timed interleaved (each query goes through every variant in turn, in a rotating
order), so load from other processes on a shared CPU falls on all of them alike; p50 is the
figure to compare. Every query is distinct text (no cache hits) except in `cached`, which asks
each query again after a first pass.

    python bench/encoder_latency.py [--rounds 400] [--memory-size 10000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))

from harness import RESULTS, machine_info, percentile  # noqa: E402

from memory import encoder as encoder_module  # noqa: E402
from memory.encoder import DIM, SentenceEncoder  # noqa: E402
from memory.index import EditMemory  # noqa: E402

QUESTIONS = [
    "How many legs does a spider have?",
    "What is the boiling point of water at sea level?",
    "Which company manufactures the Zorvel Kra 12?",
    "In which city was Monta Lumfen born?",
    "What is the native language of Quinbar Dro?",
    "Who founded Serlum Industries, and when did that happen?",
    "Which river flows through the old town of Velkra?",
    "Can you tell me which family the Fendro beetle belongs to?",
]

# (name, encoder options): "before" is the encoder as it was (eager float32, torch's threads).
VARIANTS: dict[str, dict] = {
    "before_eager_fp32": {"quantize": False, "runtime": "eager", "threads": None},
    "traced_fp32": {"quantize": False, "runtime": "torchscript", "threads": None},
    "traced_fp32_1thread": {"quantize": False, "runtime": "torchscript", "threads": 1},
    "traced_int8": {"quantize": True, "runtime": "torchscript", "threads": None},
    "traced_int8_1thread": {"quantize": True, "runtime": "torchscript", "threads": 1},
    "onnx_fp32_1thread": {"quantize": False, "runtime": "onnx", "threads": 1},
}


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "mean_ms": round(statistics.mean(ms), 3),
    }


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=400, help="queries per variant")
    ap.add_argument("--memory-size", type=int, default=10_000, help="entries for the search")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=RESULTS / "encoder_latency.json")
    args = ap.parse_args()
    names = args.variants.split(",")
    encoders = {n: SentenceEncoder(**VARIANTS[n]) for n in names}
    for enc in encoders.values():
        enc.load()
    queries = [f"{QUESTIONS[i % len(QUESTIONS)]} ({i})" for i in range(args.rounds)]
    for enc in encoders.values():  # warm-up: first calls allocate
        for q in QUESTIONS:
            enc.encode_query(q)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, q in enumerate(queries):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            times[n].append(timed(lambda enc=encoders[n], q=q: enc.encode_query(q)))
    result = {n: summary(ms) for n, ms in times.items()}

    # A cache hit: the same queries again, on the default encoder.
    default = encoders.get("traced_fp32") or next(iter(encoders.values()))
    hits = [timed(lambda q=q: default.encode_query(q)) for q in queries]
    result["cached"] = summary(hits)

    # The search after the encoder: two flat indexes of half the entries each (IKE, SERAC).
    vectors = torch.nn.functional.normalize(torch.randn(args.memory_size, DIM), dim=-1)
    indexes = [EditMemory(DIM), EditMemory(DIM)]
    half = args.memory_size // 2
    for j, index in enumerate(indexes):
        part = vectors[j * half : (j + 1) * half]
        index.add("e", [{"threshold": 0.8} for _ in range(len(part))], part)
    query = default.encode_query(QUESTIONS[0])
    search = [
        timed(lambda: [idx.search(query, k) for idx, k in zip(indexes, (4, 1), strict=True)])
        for _ in range(args.rounds)
    ]
    result["search_two_flat_indexes"] = summary(search)
    report = {
        "machine": machine_info(),
        "rounds": args.rounds,
        "memory_size": args.memory_size,
        "query_tokens": encoder_module.QUERY_TOKENS,
        "variants": {n: VARIANTS[n] for n in names},
        "results": result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, row in result.items():
        print(f"{name:24} {row}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
