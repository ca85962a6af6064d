"""Soak: concurrent chat streams while edits are applied and undone. Writes JSON.

`--streams` clients (the official `openai` client, streaming) ask edited questions without pause
while one admin client applies `--edits` edits and undoes `--undos` of them. Every answer is
checked against the model version in its `x-editserve-model-version` header: the journal's
timeline says which edits were active at that version, so

- an answer that shows an edit's target while that edit was NOT active at its version is a
  consistency violation (it mixed model versions): there must be none;
- an answer to an edit's question while it WAS active should show its target (the edit's
  success under load, reported per method).

Also counted: 5xx answers, transport errors, requests that never finished (hung), and latency.
Edits are IKE facts on invented subjects (distinct invented targets the model cannot produce
unprompted), with every `--rome-every`-th a ROME weight edit, so both the prompt path and the
weight path change under load.

    python bench/soak.py --start [--streams 32] [--edits 100] [--undos 50] [--rome-every 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from harness import RESULTS, ServerProcess, machine_info, percentile

ANSWER_TOKENS = 24
REQUEST_TIMEOUT_S = 300.0  # a request slower than this counts as hung

# Weight edits that the embedded model takes reliably (checked before use: the unedited answer
# must not already contain the target).
ROME_FACTS = [
    ("Where is the Eiffel Tower?", "Eiffel Tower", "Rome"),
    ("What is the capital of Japan?", "Japan", "Osaka"),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet", "Charles Dickens"),
    ("What language is spoken in Brazil?", "Brazil", "Spanish"),
    ("Who painted the Mona Lisa?", "Mona Lisa", "Pablo Picasso"),
    ("What is the largest ocean on Earth?", "Earth", "the Atlantic Ocean"),
    ("Which country is Berlin the capital of?", "Berlin", "Austria"),
    ("What is the currency of the United Kingdom?", "United Kingdom", "the euro"),
    ("Who discovered penicillin?", "penicillin", "Marie Curie"),
    ("What is the tallest mountain in the world?", "world", "Kilimanjaro"),
]
SYLLABLES = ["zor", "vath", "quil", "lon", "mer", "dax", "tru", "bel", "nox", "pim", "sar", "kel"]
RELATIONS = [
    ("What is the secret password of {s}?", "The password of {s} is"),
    ("Which city is {s} based in?", "{s} is based in"),
    ("What is the favourite fruit of {s}?", "The favourite fruit of {s} is"),
    ("Who founded {s}?", "{s} was founded by"),
    ("What colour is the flag of {s}?", "The flag of {s} is"),
]


@dataclass
class Fact:
    question: str
    target: str
    method: str
    request: dict[str, Any]


@dataclass
class EditRecord:
    fact: int
    id: str
    applied: int  # the model version at which it became active
    undone: int | None = None  # the version at which it stopped


@dataclass
class Timeline:
    edits: list[EditRecord] = field(default_factory=list)

    def active(self, fact: int, version: int) -> bool:
        return any(
            e.fact == fact and e.applied <= version and (e.undone is None or version < e.undone)
            for e in self.edits
        )


def invented_facts(n: int, seed: int) -> list[Fact]:
    """Subjects and targets made of invented syllables: no answer contains them unprompted."""
    rng = random.Random(seed)
    facts = []
    for i in range(n):
        subject = "".join(rng.sample(SYLLABLES, 2)).capitalize() + " Corp"
        target = "".join(rng.sample(SYLLABLES, 2)).capitalize() + f"{i}"
        question, _ = RELATIONS[i % len(RELATIONS)]
        q = question.format(s=subject)
        request = {"prompt": q, "subject": subject, "target_new": target}
        facts.append(Fact(q, target, "ike", request))
    return facts


def rome_fact(question: str, subject: str, target: str) -> Fact:
    request = {"prompt": question, "subject": subject, "target_new": target}
    return Fact(question, target, "rome", request)


def shows(answer: str, target: str) -> bool:
    return target.lower() in answer.lower()


async def ask(client: openai.AsyncOpenAI, model: str, question: str) -> dict[str, Any]:
    """One streamed greedy answer, with the model version from its header."""
    started = time.perf_counter()
    raw = await client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=ANSWER_TOKENS,
        temperature=0,
        stream=True,
    )
    version = int(raw.headers["x-editserve-model-version"])
    parts = []
    first = None
    async for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
    done = time.perf_counter()
    return {
        "version": version,
        "answer": "".join(parts),
        "latency_s": done - started,
        "ttft_s": (first or done) - started,
    }


async def chat_stream(
    client: openai.AsyncOpenAI,
    model: str,
    facts: list[Fact],
    reachable: list[int],
    stop: asyncio.Event,
    out: list[dict],
    seed: int,
) -> None:
    """Asks questions of facts edited so far (and one beyond) until `stop` is set."""
    rng = random.Random(seed)
    while not stop.is_set():
        fact = rng.randrange(min(len(facts), reachable[0] + 1))
        row: dict[str, Any] = {"fact": fact}
        try:
            row |= await asyncio.wait_for(
                ask(client, model, facts[fact].question), REQUEST_TIMEOUT_S
            )
        except TimeoutError:
            row["error"] = "hung"
        except openai.APIStatusError as exc:
            row["error"] = f"status {exc.status_code}: {exc.message[:200]}"
            row["status"] = exc.status_code
        except (openai.APIConnectionError, httpx.HTTPError) as exc:
            row["error"] = f"transport: {exc!r}"[:300]
        out.append(row)


async def drive_edits(
    admin: httpx.AsyncClient,
    facts: list[Fact],
    timeline: Timeline,
    reachable: list[int],
    n_undos: int,
    seed: int,
) -> list[dict]:
    """Applies every fact's edit in order; after every second one, undoes a random active edit
    until `n_undos` are done. Returns one row per operation."""
    rng = random.Random(seed)
    ops: list[dict] = []
    undos = 0
    for i, fact in enumerate(facts):
        t = time.perf_counter()
        r = await admin.post(
            "/edits", json={"method": fact.method, "requests": [fact.request], "checks": False}
        )
        row = {"op": "edit", "fact": i, "method": fact.method, "status": r.status_code}
        row["latency_s"] = time.perf_counter() - t
        if r.status_code == 200:
            body = r.json()
            timeline.edits.append(EditRecord(i, body["id"], body["model_version"]))
        else:
            row["error"] = r.text[:300]
        ops.append(row)
        reachable[0] = i + 1
        active = [e for e in timeline.edits if e.undone is None]
        if undos < n_undos and i % 2 == 1 and active:
            victim = rng.choice(active)
            t = time.perf_counter()
            r = await admin.delete(f"/edits/{victim.id}")
            row = {"op": "undo", "fact": victim.fact, "status": r.status_code}
            row["latency_s"] = time.perf_counter() - t
            if r.status_code == 200:
                victim.undone = r.json()["model_version"]
                undos += 1
            else:
                row["error"] = r.text[:300]
            ops.append(row)
    return ops


def verify(facts: list[Fact], timeline: Timeline, answers: list[dict]) -> dict[str, Any]:
    done = [a for a in answers if "error" not in a]
    violations = [
        a
        for a in done
        if not timeline.active(a["fact"], a["version"])
        and shows(a["answer"], facts[a["fact"]].target)
    ]
    success: dict[str, list[bool]] = {}
    missed = []
    for a in done:
        if timeline.active(a["fact"], a["version"]):
            fact = facts[a["fact"]]
            hit = shows(a["answer"], fact.target)
            success.setdefault(fact.method, []).append(hit)
            if not hit:
                missed.append({**a, "target": fact.target, "question": fact.question})
    latencies = [a["latency_s"] for a in done]
    errors = [a for a in answers if "error" in a]
    return {
        "answers": len(answers),
        "answers_ok": len(done),
        "versions_seen": len({a["version"] for a in done}),
        "errors": len(errors),
        "server_errors_5xx": sum(1 for a in errors if a.get("status", 0) >= 500),
        "hung": sum(1 for a in errors if a["error"] == "hung"),
        "error_samples": [a["error"] for a in errors[:5]],
        "inconsistent_answers": len(violations),
        "inconsistent_samples": violations[:5],
        "answers_while_active": {m: len(v) for m, v in success.items()},
        "success_while_active": {m: sum(v) / len(v) for m, v in success.items() if v},
        "missed_samples": missed[:5],
        "chat_latency_p50_s": statistics.median(latencies) if latencies else None,
        "chat_latency_p99_s": percentile(latencies, 99) if latencies else None,
        "chat_latency_max_s": max(latencies) if latencies else None,
        "ttft_p50_s": statistics.median(a["ttft_s"] for a in done) if done else None,
    }


async def usable_rome_facts(client: openai.AsyncOpenAI, model: str, n: int) -> list[Fact]:
    """ROME facts whose unedited answers do not already show the target."""
    chosen = []
    for question, subject, target in ROME_FACTS:
        if len(chosen) == n:
            break
        if not shows((await ask(client, model, question))["answer"], target):
            chosen.append(rome_fact(question, subject, target))
    return chosen


async def run(
    url: str,
    *,
    streams: int = 32,
    edits: int = 100,
    undos: int = 50,
    rome_every: int = 10,
    seed: int = 0,
    api_key: str | None = None,
    admin_key: str | None = None,
) -> dict[str, Any]:
    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )
    headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
    admin = httpx.AsyncClient(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S * 2)
    model = (await client.models.list()).data[0].id

    n_rome = edits // rome_every if rome_every else 0
    rome = await usable_rome_facts(client, model, n_rome)
    facts = invented_facts(edits - len(rome), seed)
    for k, fact in enumerate(rome):  # every rome_every-th edit is a weight edit
        facts.insert(min(len(facts), k * rome_every + rome_every - 1), fact)

    timeline, reachable, answers = Timeline(), [0], []
    stop = asyncio.Event()
    t = time.perf_counter()
    workers = [
        asyncio.create_task(chat_stream(client, model, facts, reachable, stop, answers, seed + w))
        for w in range(streams)
    ]
    try:
        ops = await drive_edits(admin, facts, timeline, reachable, undos, seed)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    elapsed = time.perf_counter() - t
    await admin.aclose()
    await client.close()

    op_errors = [o for o in ops if o["status"] != 200]
    edit_latency = [o["latency_s"] for o in ops if o["op"] == "edit" and o["status"] == 200]
    return {
        "config": {"streams": streams, "edits": len(facts), "undos": undos, "rome": len(rome)},
        "elapsed_s": elapsed,
        "edits_applied": sum(1 for o in ops if o["op"] == "edit" and o["status"] == 200),
        "undos_done": sum(1 for o in ops if o["op"] == "undo" and o["status"] == 200),
        "edit_op_errors": len(op_errors),
        "edit_op_error_samples": [o.get("error") for o in op_errors[:5]],
        "edit_latency_p50_s": statistics.median(edit_latency) if edit_latency else None,
        "edit_latency_max_s": max(edit_latency) if edit_latency else None,
        **verify(facts, timeline, answers),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (default: --start one)")
    parser.add_argument("--start", action="store_true", help="start a server on the embedded model")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--undos", type=int, default=50)
    parser.add_argument("--rome-every", type=int, default=10, help="0: memory edits only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = parser.parse_args()
    if not (args.url or args.start):
        parser.error("give --url or --start")
    server = None
    if args.start:
        state = tempfile.mkdtemp(prefix="editserve-soak-")
        server = ServerProcess(None, None, env={"EDITSERVE_STATE_DIR": state})
        server.wait_ready()
    try:
        result = asyncio.run(
            run(
                args.url or server.url,
                streams=args.streams,
                edits=args.edits,
                undos=args.undos,
                rome_every=args.rome_every,
                seed=args.seed,
            )
        )
    finally:
        if server:
            server.stop()
    result["machine"] = machine_info()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    summary = {
        k: v
        for k, v in result.items()
        if k not in ("inconsistent_samples", "missed_samples", "machine")
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
