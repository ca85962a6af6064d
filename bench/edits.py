"""Edit benchmark: latency, undo latency, success and locality of edits through the live API.

For N ZsRE records of the tuning split (from record 100 on, `--first-record`; the first 100
are the reporting split, refused unless `--force-report-records`), one edit at a time, each
undone before the next:
POST /edits (checks off, so the time is the method's and the apply's), then through the public
API the greedy chat answers to the edited prompt and its paraphrase (success: the answer contains
the target), the teacher-forced token accuracy of the target after the chat prompt
(/v1/completions echo + logprobs), and locality: the greedy answers (16 tokens) to fixed
unrelated questions, and to the record's same-subject questions, compared with the unedited
model's. Then DELETE /edits/{id}. Writes JSON.

    python bench/edits.py --start --n 50            # starts a server with a fresh journal
    python bench/edits.py --server URL --n 50       # against a running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import RESULTS, ServerProcess, machine_info, percentile

from editserve.eval.client import EvalClient as Api
from editserve.eval.metrics import contains_answer
from editserve.eval.splits import REPORT_RECORDS, add_force_argument, check_tuning

DATA = Path(__file__).resolve().parents[2] / "shared/data/knowedit/zsre/ZsRE-test-all.dev.json"
UNRELATED = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "What language is spoken in Brazil?",
    "In which city is the Eiffel Tower?",
    "What is the largest ocean on Earth?",
    "How many days are in a week?",
    "What is the boiling point of water in Celsius?",
    "Who painted the Mona Lisa?",
]
LOCALITY_TOKENS = 16
ANSWER_TOKENS = 24


def load_records(
    n: int, path: Path, start: int = REPORT_RECORDS, force: bool = False
) -> list[dict[str, Any]]:
    """Records start..start+n-1 of a data file; a range inside the reporting split (the first
    100 of an evaluation file) is refused unless forced: the benchmarks tune settings."""
    if not path.is_file():
        raise SystemExit(f"no data at {path} (../shared/data is needed for this benchmark)")
    try:
        check_tuning(path, range(start, start + n), force)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return json.loads(path.read_text())[start : start + n]


def add_records_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--first-record",
        type=int,
        default=REPORT_RECORDS,
        help=f"first record (default {REPORT_RECORDS}: the tuning split of an evaluation file)",
    )
    add_force_argument(parser)


def same_subject(record: dict) -> list[str]:
    groups = record.get("locality", {}).values()
    return [item["prompt"] for group in groups for item in group][:2]


def own_questions(records: list[dict]) -> list[str]:
    """One question per record on its subject's other facts (where the record has one)."""
    return [own[0] for own in map(same_subject, records) if own]


def target_hits(records: list[dict], answers: list[str]) -> list[bool]:
    """Whether each answer contains its record's new target."""
    return [
        contains_answer(a, [r["target_new"].strip()]) for r, a in zip(records, answers, strict=True)
    ]


def unchanged(before: list[str], after: list[str]) -> float:
    """The share of answers that are exactly as they were."""
    return sum(a == b for a, b in zip(before, after, strict=True)) / len(before)


async def run(
    url: str, admin_key: str | None, method: str, records: list[dict], chat_template: Any
) -> dict[str, Any]:
    api = Api(url, admin_key=admin_key)
    api.client.headers.update(api.admin_headers)  # the bench also calls /edits itself
    await api.start()
    unrelated_before = await api.answers(UNRELATED, LOCALITY_TOKENS)
    rows = []
    for i, rec in enumerate(records):
        questions = [rec["prompt"], rec["rephrase_prompt"]]
        own = same_subject(rec)
        own_before = await api.answers(own, LOCALITY_TOKENS)
        pre = await api.answers(questions, ANSWER_TOKENS)
        t = time.perf_counter()
        r = await api.client.post(
            "/edits",
            json={
                "method": method,
                "checks": False,
                "requests": [
                    {
                        "prompt": rec["prompt"],
                        "subject": rec["subject"],
                        "target_new": rec["target_new"],
                        "rephrase": [rec["rephrase_prompt"]],
                    }
                ],
            },
        )
        post_s = time.perf_counter() - t
        if r.status_code != 200:
            rows.append({"record": i, "error": r.text[:300]})
            print(f"[{i}] edit refused: {r.text[:200]}")
            continue
        edit = r.json()
        post = await api.answers(questions, ANSWER_TOKENS)
        # In chat the answer follows the assistant header with no space before it.
        accuracy = await api.target_accuracy(
            chat_template(rec["prompt"]), rec["target_new"].strip()
        )
        unrelated_after = await api.answers(UNRELATED, LOCALITY_TOKENS)
        own_after = await api.answers(own, LOCALITY_TOKENS)
        t = time.perf_counter()
        undo = (await api.client.delete(f"/edits/{edit['id']}")).json()
        undo_wall_s = time.perf_counter() - t
        target = [rec["target_new"].strip()]
        row = {
            "record": i,
            "subject": rec["subject"],
            "target": rec["target_new"],
            "compute_s": edit["timings"]["compute_s"],
            "apply_s": edit["timings"]["apply_s"],
            "post_s": post_s,
            "undo_s": undo["timings"]["undo_s"],
            "undo_wall_s": undo_wall_s,
            "answer_before": pre[0],
            "answer_after": post[0],
            "rephrase_after": post[1],
            "success_before": contains_answer(pre[0], target),
            "success": contains_answer(post[0], target),
            "paraphrase": contains_answer(post[1], target),
            "teacher_forced": accuracy,
            "unrelated_unchanged": sum(
                a == b for a, b in zip(unrelated_before, unrelated_after, strict=True)
            )
            / len(UNRELATED),
            "same_subject_unchanged": (
                sum(a == b for a, b in zip(own_before, own_after, strict=True)) / len(own)
            )
            if own
            else None,
        }
        rows.append(row)
        print(
            f"[{i}] {row['success']!s:5} {row['paraphrase']!s:5} tf={accuracy:.2f} "
            f"loc={row['unrelated_unchanged']:.2f} {row['compute_s']:.1f}s  "
            f"{rec['subject']} -> {rec['target_new']}: {post[0][:60]!r}"
        )
    await api.close()
    return {"rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]

    def mean(key: str) -> float | None:
        values = [float(r[key]) for r in ok if r.get(key) is not None]
        return round(statistics.mean(values), 4) if values else None

    compute = [r["compute_s"] for r in ok]
    undo_ms = [r["undo_s"] * 1000 for r in ok]
    return {
        "edits": len(ok),
        "refused": len(rows) - len(ok),
        "generated_success": mean("success"),
        "generated_paraphrase": mean("paraphrase"),
        "success_before_edit": mean("success_before"),
        "teacher_forced_accuracy": mean("teacher_forced"),
        "locality_unrelated": mean("unrelated_unchanged"),
        "locality_same_subject": mean("same_subject_unchanged"),
        "compute_s_median": round(statistics.median(compute), 2) if compute else None,
        "compute_s_p90": round(percentile(compute, 90), 2) if compute else None,
        "undo_ms_median": round(statistics.median(undo_ms), 2) if undo_ms else None,
        "undo_ms_max": round(max(undo_ms), 2) if undo_ms else None,
    }


def chat_template_for(model_path: str | None) -> Any:
    """Renders a question as the server does, to find where the target starts."""
    import os

    from transformers import AutoTokenizer

    from editserve.modelstore import EMBEDDED_MODEL_NAME
    from editserve.prompts import question_text

    cache = Path(os.environ.get("EDITSERVE_CACHE_DIR", "~/.cache/editserve")).expanduser()
    folder = model_path or cache / "models" / f"{EMBEDDED_MODEL_NAME}-fp32"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return lambda q: question_text(tokenizer, q)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", default="http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start a server (fresh journal)")
    parser.add_argument("--admin-key")
    parser.add_argument("--model", help="local HF folder (default: the embedded model)")
    parser.add_argument("--method", default="rome")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--data", type=Path, default=DATA)
    add_records_arguments(parser)
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "edits.json"
    )
    args = parser.parse_args()
    records = load_records(args.n, args.data, args.first_record, args.force_report_records)
    server = None
    url = args.server
    if args.start:
        state = tempfile.mkdtemp(prefix="editserve-bench-state-")
        server = ServerProcess(args.model, None, env={"EDITSERVE_STATE_DIR": state})
        server.wait_ready()
        url = server.url
    try:
        result = asyncio.run(
            run(url, args.admin_key, args.method, records, chat_template_for(args.model))
        )
    finally:
        if server is not None:
            server.stop()
    report = {
        "machine": machine_info(),
        "method": args.method,
        "data": str(args.data),
        "records": f"{args.first_record}-{args.first_record + len(records) - 1}",
        "n": len(records),
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
