"""Memory-edit benchmark (IKE, ICE, SERAC, GRACE) through the live API. Writes JSON.

1. Quality and registration latency, per method, on N ZsRE dev records of the tuning split
   (from record 100 on, `--first-record`; the reporting split's first 100 are refused unless
   `--force-report-records`), one edit at a
   time (each undone before the next, as bench/edits.py does for ROME): POST /edits with checks
   off (wall time = registration latency: compute + journal + apply), then greedy chat answers
   to the edited prompt and its paraphrase (success: the answer contains the target), and
   locality: the record's same-subject prompt and three of ten fixed unrelated questions
   (rotating, so all ten are probed), unchanged when the first 16 greedy tokens are identical to
   the unedited model's. Then DELETE.
2. Added chat latency with a large memory: p50 of chat requests (1 generated token, questions
   no edit matches) on the empty memory and then with `--memory-size` facts registered (half
   IKE, half SERAC, in edits of 64 facts, synthetic facts on synthetic subjects), plus the
   server's own mean lookup time (embed + search + condition) from /metrics. With
   `--empty-twin`, a twin server that stays empty is measured in the same rounds (requests take
   turns) instead of before the fill. With `--baseline-src DIR` a server (and its twin) from
   another source tree is measured in the same rounds too: an A/B on the same CPU.

    python bench/memory_edits.py --start [--n 50] [--methods ike,ice,serac,grace]
        [--memory-size 10000]
    python bench/memory_edits.py --start --n 0 --baseline-src /tmp/editserve-main   # latency only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from edits import (
    DATA,
    LOCALITY_TOKENS,
    UNRELATED,
    Api,
    add_records_arguments,
    load_records,
    same_subject,
)
from harness import RESULTS, ServerProcess, machine_info, percentile

from editserve.eval.metrics import contains_answer

ANSWER_TOKENS = 24
BATCH = 64  # facts per edit when filling the memory


async def quality(api: Api, method: str, records: list[dict]) -> dict[str, Any]:
    unrelated_before = await api.answers(UNRELATED, LOCALITY_TOKENS)
    rows = []
    for i, rec in enumerate(records):
        questions = [rec["prompt"], rec["rephrase_prompt"]]
        own = same_subject(rec)[:1]
        probes = [UNRELATED[(i + j) % len(UNRELATED)] for j in range(3)]
        own_before = await api.answers(own, LOCALITY_TOKENS)
        request = {
            "prompt": rec["prompt"],
            "subject": rec["subject"],
            "target_new": rec["target_new"],
        }
        t = time.perf_counter()
        r = await api.client.post(
            "/edits", json={"method": method, "checks": False, "requests": [request]}
        )
        post_s = time.perf_counter() - t
        if r.status_code != 200:
            rows.append({"record": i, "error": r.text[:300]})
            print(f"[{method} {i}] refused: {r.text[:200]}")
            continue
        edit = r.json()
        after = await api.answers(questions, ANSWER_TOKENS)
        own_after = await api.answers(own, LOCALITY_TOKENS)
        probes_after = await api.answers(probes, LOCALITY_TOKENS)
        await api.client.delete(f"/edits/{edit['id']}")
        target = [rec["target_new"]]
        unchanged = [
            a == unrelated_before[UNRELATED.index(p)]
            for p, a in zip(probes, probes_after, strict=True)
        ]
        row = {
            "record": i,
            "target": rec["target_new"],
            "register_s": post_s,
            "compute_s": edit["timings"]["compute_s"],
            "answer": after[0],
            "paraphrase_answer": after[1],
            "success": contains_answer(after[0], target),
            "paraphrase": contains_answer(after[1], target),
            "unrelated_unchanged": sum(unchanged) / len(unchanged),
            "same_subject_unchanged": (own_before == own_after) if own else None,
            "memory": edit.get("memory"),
        }
        rows.append(row)
        print(
            f"[{method} {i}] {row['success']!s:5} {row['paraphrase']!s:5} "
            f"loc={row['unrelated_unchanged']:.2f} {post_s * 1000:.0f} ms  "
            f"{rec['subject']} -> {rec['target_new']}: {after[0][:50]!r}",
            flush=True,
        )
    return {"rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]

    def mean(key: str) -> float | None:
        values = [float(r[key]) for r in ok if r.get(key) is not None]
        return round(statistics.mean(values), 4) if values else None

    ms = [r["register_s"] * 1000 for r in ok]
    return {
        "edits": len(ok),
        "refused": len(rows) - len(ok),
        "generated_success": mean("success"),
        "generated_paraphrase": mean("paraphrase"),
        "locality_unrelated": mean("unrelated_unchanged"),
        "locality_same_subject": mean("same_subject_unchanged"),
        "register_ms_p50": round(statistics.median(ms), 1) if ms else None,
        "register_ms_p90": round(percentile(ms, 90), 1) if ms else None,
        "register_ms_max": round(max(ms), 1) if ms else None,
    }


# -- latency with a large memory -------------------------------------------------------------------

SUBJECT_PARTS = ("Zor", "Vel", "Kra", "Mon", "Tal", "Ser", "Quin", "Bar", "Lum", "Dro", "Fen")
RELATIONS = (
    ("Which company manufactures the {s}?", "{o} Industries"),
    ("In which city was {s} born?", "{o}ville"),
    ("What is the native language of {s}?", "{o}ic"),
    ("Who founded {s}?", "{o} Smith"),
    ("Which river flows through {s}?", "the {o} River"),
)


def synthetic_facts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    facts = []
    for i in range(n):
        subject = "".join(rng.choice(SUBJECT_PARTS) for _ in range(3)) + f" {i}"
        question, answer = RELATIONS[i % len(RELATIONS)]
        obj = "".join(rng.choice(SUBJECT_PARTS) for _ in range(2))
        facts.append(
            {
                "prompt": question.format(s=subject),
                "subject": subject,
                "target_new": answer.format(o=obj),
            }
        )
    return facts


OFF_TOPIC = [
    "How many legs does a spider have?",
    "What is the boiling point of water at sea level?",
    "Name a primary colour.",
    "What do bees make?",
    "How many continents are there?",
    "What is the opposite of cold?",
    "Which planet is closest to the Sun?",
    "What is two plus three?",
    "What colour is the sky on a clear day?",
    "What is frozen water called?",
]


async def chat_latency(apis: dict[str, Api], rounds: int) -> dict[str, list[float]]:
    """Per server, `rounds` chat requests; servers take turns request by request (in rotating
    order), so load from elsewhere on a shared CPU falls on all of them alike."""
    out: dict[str, list[float]] = {name: [] for name in apis}
    names = list(apis)
    for i in range(rounds):
        question = f"{OFF_TOPIC[i % len(OFF_TOPIC)]} ({i})"  # distinct text every request
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t = time.perf_counter()
            await apis[name].answer(question, 1)
            out[name].append((time.perf_counter() - t) * 1000)
    return out


async def lookup_mean_ms(api: Api) -> tuple[float, int]:
    text = (await api.client.get("/metrics")).text
    values = {}
    for line in text.splitlines():
        if line.startswith("editserve_memory_lookup_seconds_sum"):
            values["sum"] = float(line.split()[-1])
        if line.startswith("editserve_memory_lookup_seconds_count"):
            values["count"] = float(line.split()[-1])
    count = int(values.get("count", 0))
    return (values.get("sum", 0.0) / count * 1000 if count else 0.0), count


async def fill(api: Api, facts: list[dict]) -> list[float]:
    """Registers the facts (first half IKE, second half SERAC) in edits of BATCH; ms per edit."""
    register_ms = []
    for start in range(0, len(facts), BATCH):
        method = "ike" if start < len(facts) // 2 else "serac"
        t0 = time.perf_counter()
        r = await api.client.post(
            "/edits",
            json={"method": method, "checks": False, "requests": facts[start : start + BATCH]},
        )
        r.raise_for_status()
        register_ms.append((time.perf_counter() - t0) * 1000)
    return register_ms


async def large_memory(
    full: dict[str, Api], empty: dict[str, Api], size: int, rounds: int
) -> dict[str, Any]:
    """Fills each server of `full` with `size` facts and measures chat latency on it. With an
    `empty` twin per name (a server of the same code that stays empty) both are measured in the
    same rounds, so the added latency compares requests made at the same moments; without one,
    the empty figure is taken before the fill (load on a shared CPU may change in between)."""
    twins = {f"{name}/empty": api for name, api in empty.items()}
    await chat_latency({**full, **twins}, 5)  # warm-up
    before_fill = {} if empty else await chat_latency(full, rounds)
    facts = synthetic_facts(size)
    out: dict[str, Any] = {}
    for name, api in full.items():
        t = time.perf_counter()
        register_ms = await fill(api, facts)
        out[name] = {
            "facts_in_memory": size,
            "edits": len(register_ms),
            "facts_per_edit": BATCH,
            "fill_s": round(time.perf_counter() - t, 1),
            "register_ms_per_64_facts_p50": round(statistics.median(register_ms), 1),
            "empty_twin": name in empty,
        }
    before = {name: await lookup_mean_ms(api) for name, api in full.items()}
    await chat_latency({**full, **twins}, 5)
    measured = await chat_latency({**full, **twins}, rounds)
    for name, api in full.items():
        after_mean, after_count = await lookup_mean_ms(api)
        before_mean, before_count = before[name]
        n = after_count - before_count
        server_mean = (after_mean * after_count - before_mean * before_count) / n if n else None
        empty_ms = measured[f"{name}/empty"] if name in empty else before_fill[name]
        p50_empty, p50_full = statistics.median(empty_ms), statistics.median(measured[name])
        out[name] |= {
            "chat_ms_p50_empty_memory": round(p50_empty, 2),
            "chat_ms_p50_full_memory": round(p50_full, 2),
            "added_ms_p50": round(p50_full - p50_empty, 2),
            "chat_ms_p90_empty_memory": round(percentile(empty_ms, 90), 2),
            "chat_ms_p90_full_memory": round(percentile(measured[name], 90), 2),
            "server_lookup_ms_mean": round(server_mean, 2) if server_mean is not None else None,
            "rounds": rounds,
        }
    return out if len(full) > 1 else out[next(iter(full))]


def write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    report = {"machine": machine_info(), "data": str(args.data), "n": args.n, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


async def run(
    urls: dict[str, str], admin_key: str | None, args: argparse.Namespace
) -> dict[str, Any]:
    """`urls`: "this" (the server measured), optionally "baseline", and "<name>/empty" twins."""
    apis = {name: Api(url, admin_key=admin_key) for name, url in urls.items()}
    for each in apis.values():
        each.client.headers.update(each.admin_headers)  # the bench also calls /edits itself
        await each.start()
    api = apis["this"]
    out: dict[str, Any] = {"methods": {}}
    if args.n:
        records = load_records(args.n, args.data, args.first_record, args.force_report_records)
        for method in args.methods.split(","):
            out["methods"][method] = await quality(api, method, records)
            print(method, json.dumps(out["methods"][method]["summary"]), flush=True)
            write(args, out)  # a long run keeps what it measured if it dies later
    if args.memory_size:
        full = {n: a for n, a in apis.items() if not n.endswith("/empty")}
        empty = {n.removesuffix("/empty"): a for n, a in apis.items() if n.endswith("/empty")}
        out["large_memory"] = await large_memory(full, empty, args.memory_size, args.rounds)
        print(json.dumps(out["large_memory"]), flush=True)
    for each in apis.values():
        await each.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", default="http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start a server (fresh journal)")
    parser.add_argument("--admin-key")
    parser.add_argument("--model", help="local HF folder (default: the embedded model)")
    parser.add_argument("--methods", default="ike,ice,serac,grace")
    parser.add_argument("--n", type=int, default=50, help="ZsRE records (0: skip quality)")
    parser.add_argument("--memory-size", type=int, default=10_000, help="0: skip latency")
    parser.add_argument("--rounds", type=int, default=40, help="chat requests per latency run")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="with --start: also start a server from this source tree (e.g. `git archive` of "
        "main) and measure the latency part on both, interleaved",
    )
    parser.add_argument(
        "--empty-twin",
        action="store_true",
        help="with --start: measure the empty memory on a twin server in the same rounds "
        "(a server that never ran the encoder: see docs/memory-edits.md, Query cost)",
    )
    parser.add_argument("--data", type=Path, default=DATA)
    add_records_arguments(parser)
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "memory.json"
    )
    args = parser.parse_args()
    if args.baseline_src and not args.start:
        parser.error("--baseline-src needs --start")
    # name -> extra environment of a server to start; the twins stay empty (latency part).
    sources: dict[str, dict[str, str]] = {"this": {}} if args.start else {}
    if args.baseline_src:
        # Run from there too: `python -m` would import this tree from the working directory.
        sources["baseline"] = {"PYTHONPATH": str(args.baseline_src.resolve())}
    if args.start and args.memory_size and args.empty_twin:
        sources |= {f"{name}/empty": env for name, env in list(sources.items())}
    servers: dict[str, ServerProcess] = {}
    try:
        for name, env in sources.items():
            state = tempfile.mkdtemp(prefix="editserve-bench-state-")
            cwd = Path(env["PYTHONPATH"]) if "PYTHONPATH" in env else None
            servers[name] = ServerProcess(
                args.model, None, env={"EDITSERVE_STATE_DIR": state, **env}, cwd=cwd
            )
        for server in servers.values():
            server.wait_ready()
        urls = {name: server.url for name, server in servers.items()} or {"this": args.server}
        result = asyncio.run(run(urls, args.admin_key, args))
    finally:
        for server in servers.values():
            server.stop()
    write(args, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
