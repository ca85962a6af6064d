"""Batch-edit benchmark (MEMIT, AlphaEdit, FT-M) through the live API. Writes JSON.

1. Statistics: the time to compute E[kkᵀ] of every edited layer, from text the model samples
   and (when ../shared/data is there) from Wikipedia text; in-process, into a fresh cache that
   the server then reads.
Records come from the tuning split (ZsRE dev records from 100 on, `--first-record`; the first 100
are the reporting split, refused unless `--force-report-records`).

2. Batches: for each method, one edit of the first 1, 10 and 100 records (checks off, so
   the time is the method's), then for the 100-record batch, through the public API: the greedy
   chat answers to every prompt and paraphrase (success: the answer contains the target), the
   teacher-forced token accuracy of the targets (/v1/completions echo + logprobs), and locality
   on 40 unrelated questions (10 general, 30 other ZsRE prompts): the share whose 16-token
   greedy answer is unchanged, and the teacher-forced agreement with the unedited answers'
   tokens. Each edit is undone before the next.
3. Sequential: `--sequential N` edits in batches of `--seq-batch` kept on one live model, with
   efficacy on all edits so far and locality after each batch.

    python bench/batch_edits.py --start                       # everything, self-sampled stats
    python bench/batch_edits.py --start --stats-source wiki   # the server uses Wikipedia stats
    python bench/batch_edits.py --start --methods alphaedit --batches 100 --sequential 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from edits import (
    DATA,
    UNRELATED,
    Api,
    add_records_arguments,
    chat_template_for,
    load_records,
    own_questions,
    target_hits,
    unchanged,
)
from harness import RESULTS, ServerProcess, machine_info, write_report

WIKI = DATA.parents[2] / "corpus_wikitext" / "wiki.valid.dev.raw"
LOCALITY_TOKENS = 16
ANSWER_TOKENS = 24


def compute_stats(cache_root: Path, sources: dict[str, str | None], tokens: int) -> dict:
    """Seconds to compute every edited layer's statistics from each source (fresh cache)."""
    from editserve.cli import stats_context, stats_layers
    from editserve.modelstore import load_model
    from methods.stats import StatsCache, StatsSource

    cache_dir = Path(os.environ.get("EDITSERVE_CACHE_DIR", "~/.cache/editserve")).expanduser()
    loaded = load_model(None, cache_dir)
    layers = stats_layers(loaded.model.config)
    ctx = stats_context(loaded)
    cache = StatsCache(cache_root)
    out = {"layers": layers, "tokens": tokens}
    for name, corpus in sources.items():
        started = time.perf_counter()
        cache.get(ctx, StatsSource(corpus=corpus, n_tokens=tokens), layers)
        out[f"{name}_s"] = round(time.perf_counter() - started, 1)
        print(f"statistics from {name}: {out[f'{name}_s']} s for layers {layers}")
    return out


class Scorer:
    """Success and locality of edits through the public API."""

    def __init__(self, api: Api, chat_template: Any, probes: list[str]) -> None:
        self.api, self.chat_template, self.probes = api, chat_template, probes
        self.before: list[str] = []
        self.own_before: dict[str, str] = {}  # unedited answers to same-subject questions

    async def baseline(self, records: list[dict]) -> None:
        self.before = await self.api.answers(self.probes, LOCALITY_TOKENS)
        own = own_questions(records)
        self.own_before = dict(zip(own, await self.api.answers(own, LOCALITY_TOKENS), strict=True))

    async def score(
        self, records: list[dict], paraphrase: bool = True, latest: int = 0
    ) -> dict[str, float]:
        api = self.api
        prompts = [r["prompt"] for r in records]
        answers = await api.answers(prompts, ANSWER_TOKENS)
        hits = target_hits(records, answers)
        result = {"success": sum(hits) / len(hits)}
        if len(records) > latest > 0:  # the newest `latest` records on their own
            result["latest_success"] = sum(hits[-latest:]) / latest
        if paraphrase:
            rephrased = await api.answers([r["rephrase_prompt"] for r in records], ANSWER_TOKENS)
            result["paraphrase"] = sum(target_hits(records, rephrased)) / len(records)
            # The edited subjects' other facts (KnowEdit's same-subject locality prompts).
            own = own_questions(records)
            own_before = [self.own_before[q] for q in own]
            result["same_subject_unchanged"] = unchanged(
                own_before, await api.answers(own, LOCALITY_TOKENS)
            )
        accuracy = await asyncio.gather(
            *(
                # In chat the answer follows the assistant header with no space before it.
                api.target_accuracy(self.chat_template(r["prompt"]), r["target_new"].strip())
                for r in records
            )
        )
        result["teacher_forced"] = sum(accuracy) / len(accuracy)
        after = await api.answers(self.probes, LOCALITY_TOKENS)
        result["locality"] = unchanged(self.before, after)
        agreement = await asyncio.gather(
            *(
                api.target_accuracy(self.chat_template(q), answer)
                for q, answer in zip(self.probes, self.before, strict=True)
            )
        )
        result["locality_teacher_forced"] = sum(agreement) / len(agreement)
        return {k: round(v, 4) for k, v in result.items()}


def _requests(records: list[dict]) -> list[dict]:
    return [
        {"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]}
        for r in records
    ]


async def post_edit(
    api: Api, method: str, records: list[dict], hparams: dict | None = None
) -> tuple[dict, float]:
    body = {"method": method, "checks": False, "requests": _requests(records)}
    if hparams:
        body["hparams"] = hparams
    started = time.perf_counter()
    r = await api.client.post("/edits", json=body)
    elapsed = time.perf_counter() - started
    if r.status_code != 200:
        raise RuntimeError(f"{method} edit of {len(records)} refused: {r.text[:300]}")
    return r.json(), elapsed


async def run_batches(
    scorer: Scorer, methods: list[str], sizes: list[int], records: list[dict]
) -> dict:
    out: dict[str, Any] = {}
    for method in methods:
        out[method] = {}
        for size in sizes:
            edit, elapsed = await post_edit(scorer.api, method, records[:size])
            row: dict[str, Any] = {
                "wall_s": round(elapsed, 2),
                "compute_s": round(edit["timings"]["compute_s"], 2),
                "apply_s": round(edit["timings"]["apply_s"], 4),
            }
            if size == max(sizes):
                row.update(await scorer.score(records[:size]))
            undo = (await scorer.api.client.delete(f"/edits/{edit['id']}")).json()
            row["undo_ms"] = round(undo["timings"]["undo_s"] * 1000, 2)
            out[method][str(size)] = row
            print(f"{method} batch {size}: {row}")
    return out


async def run_sequential(
    scorer: Scorer, method: str, records: list[dict], batch: int, hparams: dict | None = None
) -> list[dict]:
    curve, ids = [], []
    for start in range(0, len(records), batch):
        edit, elapsed = await post_edit(scorer.api, method, records[start : start + batch], hparams)
        ids.append(edit["id"])
        done = records[: start + batch]
        point = {"edits": len(done), "compute_s": round(edit["timings"]["compute_s"], 2)}
        point.update(await scorer.score(done, paraphrase=False, latest=len(done) - start))
        curve.append(point)
        print(f"{method} sequential: {point}")
    for edit_id in ids:  # leave the model as it was
        await scorer.api.client.delete(f"/edits/{edit_id}")
    return curve


async def run(args: argparse.Namespace, url: str, records: list[dict]) -> dict:
    api = Api(url, admin_key=args.admin_key)
    api.client.headers.update(api.admin_headers)  # the bench also calls /edits itself
    await api.start()
    # Locality questions from records no run here edits (tuning split, past 600).
    probes = UNRELATED + [r["prompt"] for r in load_records(30, args.data, 600)]
    scorer = Scorer(api, chat_template_for(None), probes)
    sizes = [int(s) for s in args.batches.split(",") if s]
    await scorer.baseline(records[: max(sizes, default=0)])  # only batches score same-subject
    # The unedited model asked again: how often answers differ without any edit (batching noise)
    again = await api.answers(probes, LOCALITY_TOKENS)
    same = unchanged(scorer.before, again)
    result: dict[str, Any] = {"locality_unedited_repeat": same}
    if sizes:
        result["batches"] = await run_batches(
            scorer, args.methods.split(","), sizes, records[: max(sizes)]
        )
    if args.sequential:
        result["sequential"] = {
            method: await run_sequential(
                scorer, method, records[: args.sequential], args.seq_batch, args.seq_hparams
            )
            for method in args.seq_methods.split(",")
        }
    await api.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", default="http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start a server (fresh journal)")
    parser.add_argument("--admin-key")
    parser.add_argument("--methods", default="memit,alphaedit,ft")
    parser.add_argument("--batches", default="1,10,100", help="batch sizes ('' for none)")
    parser.add_argument("--sequential", type=int, default=0, help="edits kept in sequence")
    parser.add_argument("--seq-batch", type=int, default=50)
    parser.add_argument("--seq-methods", default="alphaedit,memit")
    parser.add_argument(
        "--seq-hparams", type=json.loads, help="sequential edits' hparams, e.g. '{\"l2\": 0.1}'"
    )
    parser.add_argument("--stats-source", choices=["self", "wiki"], default="self")
    parser.add_argument("--stats-tokens", type=int, default=20_000)
    parser.add_argument(
        "--cached-stats",
        action="store_true",
        help="skip timing the statistics: the server uses (or computes) the cached ones",
    )
    parser.add_argument("--data", type=Path, default=DATA)
    add_records_arguments(parser)
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "batch_edits.json"
    )
    args = parser.parse_args()
    n = max([int(s) for s in args.batches.split(",") if s] + [args.sequential])
    records = load_records(n, args.data, args.first_record, args.force_report_records)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "args": vars(args) | {"data": str(args.data)},
    }
    server, url = None, args.server
    if args.start:
        # Statistics first, timed on a fresh cache; the server then finds them there.
        if not args.cached_stats:
            sources = {"self": None, **({"wiki": str(WIKI)} if WIKI.is_file() else {})}
            fresh = Path(tempfile.mkdtemp(prefix="editserve-bench-stats-"))
            report["statistics"] = compute_stats(fresh, sources, args.stats_tokens)
            cache_dir = Path(os.environ.get("EDITSERVE_CACHE_DIR", "~/.cache/editserve"))
            shutil.copytree(fresh, cache_dir.expanduser() / "stats", dirs_exist_ok=True)
        env = {
            "EDITSERVE_STATE_DIR": tempfile.mkdtemp(prefix="editserve-bench-state-"),
            "EDITSERVE_STATS_TOKENS": str(args.stats_tokens),
        }
        if args.stats_source == "wiki":
            env["EDITSERVE_STATS_CORPUS"] = str(WIKI)
        server = ServerProcess(None, None, env=env)
        server.wait_ready()
        url = server.url
    try:
        report.update(asyncio.run(run(args, url, records)))
    finally:
        if server is not None:
            server.stop()
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
