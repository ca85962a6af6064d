"""How the injected fact and the injected erasure are worded for IKE, ICE and SERAC: each candidate
wording put into its own chat, through the live API, on tuning records. Writes JSON.

- Facts: ZsRE dev records of the tuning split (from record 100 on, `--first-record`; the first
  100 are the reporting split, refused unless `--force-report-records`). Each record's fact is
  put into its own chat in each wording; greedy answers of `--tokens`; success: the answer to the
  edited question, and to its paraphrase, contains the target.
- Erasures: Sanitation's training file (`trivia_qa_train.json`, K_F: questions to forget), none
  of which is in the reporting file. Success: the answer contains "I don't know." (normalised),
  as the evaluation scores it.

The candidates include what the server does (`methods.ike.condition`, marked `served`), so a
wording that beats it shows up as the best row. This is the committed form of the hand-run
measurements in docs/memory-edits.md ("Wording and position", "Erasing a fact"), which were made
on ZsRE records 50-79 and on all 64 Sanitation test records (in-sample: re-run with this).

    python bench/memory_wording.py --start [--n 30] [--erase-n 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edits import DATA, Api, add_records_arguments, load_records
from harness import RESULTS, ServerProcess, machine_info, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editserve.eval.datasets import REFUSAL  # noqa: E402
from editserve.eval.datasets import load as load_data  # noqa: E402
from editserve.eval.metrics import contains_answer  # noqa: E402
from methods.ike import condition  # noqa: E402
from methods.memory_common import fact_text  # noqa: E402

SANITATION_TRAIN = DATA.parents[1] / "sanitation" / "trivia_qa_train.json"
Messages = list[dict[str, str]]


def user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


# (name, messages for (prompt, target, question asked)); "served" rows are the server's own.
FACT_WORDINGS: list[tuple[str, Callable[[str, str, str], Messages]]] = [
    ("no fact (the model as is)", lambda p, t, q: user(q)),
    (
        'system message "Fact: {prompt} {target}."',
        lambda p, t, q: [{"role": "system", "content": f"Fact: {p} {t}."}, *user(q)],
    ),
    (
        'user prefix "Fact: {prompt} {target}.\\n{question}"',
        lambda p, t, q: user(f"Fact: {p} {t}.\n{q}"),
    ),
    (
        'user prefix "New fact: {prompt} {target}.\\nUsing the new fact, answer: {question}"',
        lambda p, t, q: user(f"New fact: {p} {t}.\nUsing the new fact, answer: {q}"),
    ),
    (
        "served: ICE (the fact line, no demonstrations)",
        lambda p, t, q: condition(user(q), [fact_text(p, t)], False),
    ),
    (
        "served: IKE (3 demonstration turns + the fact line)",
        lambda p, t, q: condition(user(q), [fact_text(p, t)], True),
    ),
]

ERASE_WORDINGS: list[tuple[str, Callable[[str], Messages]]] = [
    ("no erasure (the model as is)", lambda q: user(q)),
    (
        "the fact line in the user turn",
        lambda q: user(f"New fact: {fact_text(q, REFUSAL)}.\nUsing the new fact, answer: {q}"),
    ),
    (
        'an earlier exchange: the question, answered "I don\'t know."',
        lambda q: [*user(q), {"role": "assistant", "content": REFUSAL}, *user(q)],
    ),
    (
        "an instruction in the user turn",
        lambda q: user(f"You must not answer this question: {q} Reply only: {REFUSAL}"),
    ),
    (
        "served: an earlier exchange of the fact line and question, answered the refusal",
        lambda q: condition(user(q), [], False, refusals=[(q, REFUSAL)]),
    ),
]


async def answer(api: Api, messages: Messages, tokens: int) -> str:
    body = {"model": api.model, "messages": messages, "temperature": 0, "max_tokens": tokens}
    async with api.slots:
        r = await api.client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def share(hits: list[bool]) -> float:
    return round(sum(hits) / len(hits), 4) if hits else 0.0


async def facts(api: Api, records: list[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    rows = []
    for name, wording in FACT_WORDINGS:
        asked = [(r, q) for r in records for q in (r["prompt"], r["rephrase_prompt"])]
        got = await asyncio.gather(
            *(answer(api, wording(r["prompt"], r["target_new"], q), tokens) for r, q in asked)
        )
        hits = [contains_answer(a, [r["target_new"]]) for (r, _), a in zip(asked, got, strict=True)]
        rows.append({"wording": name, "prompt": share(hits[0::2]), "paraphrase": share(hits[1::2])})
        print(rows[-1], flush=True)
    return rows


async def erasures(api: Api, questions: list[str], tokens: int) -> list[dict[str, Any]]:
    rows = []
    for name, wording in ERASE_WORDINGS:
        got = await asyncio.gather(*(answer(api, wording(q), tokens) for q in questions))
        hits = [contains_answer(a, [REFUSAL]) for a in got]
        rows.append({"wording": name, "refused": sum(hits), "of": len(hits)})
        print(rows[-1], flush=True)
    return rows


def best(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    top = max(rows, key=key)
    return {"best": top["wording"], "served_is_best": top["wording"].startswith("served")}


async def run(args: argparse.Namespace, url: str, records: list[dict]) -> dict[str, Any]:
    api = Api(url, concurrency=16)
    await api.start()
    out: dict[str, Any] = {}
    if records:
        rows = await facts(api, records, args.tokens)
        out["facts"] = {
            "records": f"{args.first_record}-{args.first_record + len(records) - 1} of "
            f"{args.data.name}",
            "rows": rows,
            **best(rows, lambda r: r["prompt"] + r["paraphrase"]),
        }
    if args.erase_n:
        _, erase = load_data(args.erase_data, args.erase_n)
        questions = [r.requests[0]["prompt"] for r in erase]
        rows = await erasures(api, questions, args.erase_tokens)
        out["erasures"] = {
            "records": f"0-{len(questions) - 1} of {args.erase_data.name}",
            "rows": rows,
            **best(rows, lambda r: r["refused"]),
        }
    await api.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", default="http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start a server (fresh journal)")
    parser.add_argument("--data", type=Path, default=DATA)
    add_records_arguments(parser)
    parser.add_argument("--n", type=int, default=30, help="ZsRE records for the fact wordings")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--erase-data", type=Path, default=SANITATION_TRAIN)
    parser.add_argument("--erase-n", type=int, default=64, help="questions to erase (0: skip)")
    parser.add_argument("--erase-tokens", type=int, default=12)
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "memory_wording.json"
    )
    args = parser.parse_args()
    if args.erase_n and ".dev." in args.erase_data.name and not args.force_report_records:
        sys.exit(
            f"{args.erase_data.name} is the reporting file: erase wordings tune on the train file"
        )
    # Refused before a server starts: records of the reporting split are not for choosing.
    records = (
        load_records(args.n, args.data, args.first_record, args.force_report_records)
        if args.n
        else []
    )
    server, url = None, args.server
    if args.start:
        state = tempfile.mkdtemp(prefix="editserve-bench-state-")
        server = ServerProcess(None, None, env={"EDITSERVE_STATE_DIR": state})
        server.wait_ready()
        url = server.url
    try:
        result = asyncio.run(run(args, url, records))
    finally:
        if server is not None:
            server.stop()
    write_report(args.out, {"machine": machine_info(), **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
