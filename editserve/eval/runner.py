"""Apply, score and undo edits through a live server; resumable from its output folder.

Independent mode (the KnowEdit protocol): per record, observe the unedited model, POST the edit,
observe again, DELETE it. Sequential mode: observe every record on the unedited model first
(EasyEdit computes all pre-edit outputs before the first edit, so locality stays relative to
the original model), then apply the edits one after another on the live model, scoring every
edit made so far after 1, 10, 100 and 1,000 edits (and after the last).

Files in the output folder:
- `run.json`: what the run is (method, data, n, settings, model); a resume must match it;
- `baseline.jsonl`: the unedited model's observations per record (may be shared by methods);
- `records.jsonl` (independent) / `sequence.jsonl` (sequential): one line per record done or
  edit made, and per checkpoint; `pending.json`: an edit made and not yet undone;
- `checkpoint-K.jsonl` (sequential): the observations behind the checkpoint after K edits;
- `results.json`, `results.md`: the summary, rewritten at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from editserve.eval import report
from editserve.eval.client import EditRefused, EvalClient
from editserve.eval.datasets import EvalRecord
from editserve.eval.measure import MeasureSettings, measure
from editserve.eval.scoring import add_counts, probe_counts, score, summarise
from editserve.eval.splits import describe, load_split
from editserve.eval.store import JsonLines, write_json

log = logging.getLogger("editserve.eval")
CHECKPOINTS = (1, 10, 100, 1000)


class ResumeError(RuntimeError):
    """The output folder or the server does not match the run being resumed."""


class ServerAlreadyEdited(RuntimeError):
    """A new run asked for the unedited model, and the server has edits applied."""


@dataclass
class RunConfig:
    server: str
    method: str
    data: Path
    out: Path
    n: int | None = None
    split: str = "report"  # report | tune | all (editserve.eval.splits)
    sequential: bool = False
    hparams: dict[str, Any] | None = None
    scope: str | None = None  # "global" or "question" (None: the method's default)
    settings: MeasureSettings = field(default_factory=MeasureSettings)
    max_probes: int | None = None
    checkpoints: tuple[int, ...] = CHECKPOINTS
    baseline: Path | None = None  # default: out/baseline.jsonl
    api_key: str | None = None
    admin_key: str | None = None
    concurrency: int = 32  # requests in flight (the server decodes up to 32 together)
    records_in_flight: int = 8  # records observed at once (unedited, and at checkpoints)
    cleanup: bool = False  # sequential: undo the run's edits at the end
    require_unedited: bool = False  # refuse to start a new run on a server with edits applied
    progress: bool = True


class Run:
    def __init__(self, cfg: RunConfig, client: EvalClient) -> None:
        self.cfg, self.client = cfg, client
        self.format, self.records = load_split(
            cfg.data, cfg.split, cfg.n, cfg.settings.seed, cfg.max_probes
        )
        self.baseline_log = JsonLines(cfg.baseline or cfg.out / "baseline.jsonl")
        self.baseline: dict[int, dict] = {}

    def identity(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "method": c.method,
            "data": str(Path(c.data).resolve()),
            "format": self.format,
            "n": len(self.records),
            "split": c.split,
            "records": describe(c.data, c.split, [r.index for r in self.records]),
            "sequential": c.sequential,
            "hparams": c.hparams,
            **({"scope": c.scope} if c.scope else {}),
            "settings": c.settings.as_dict(),
            "max_probes": c.max_probes,
            "model": self.client.model,
        }

    def _bar(self, total: int, desc: str, initial: int = 0) -> tqdm:
        return tqdm(
            total=total, initial=initial, desc=desc, file=sys.stderr, disable=not self.cfg.progress
        )

    # -- set-up and resume checks ----------------------------------------------------------------

    async def open(self) -> dict[str, Any]:
        """Checks (or writes) run.json; returns it."""
        path = self.cfg.out / "run.json"
        ident = self.identity()
        if path.is_file():
            saved = json.loads(path.read_text())
            _legacy_split(saved["identity"], ident, self.records)
            differ = [k for k in ident if saved["identity"].get(k) != ident[k]]
            if set(differ) <= {"n", "records"} and differ and not self.cfg.sequential:
                # Records are a file's first N: an independent run grows or shrinks freely.
                saved["identity"].update(n=ident["n"], records=ident["records"])
                write_json(path, saved)
                return saved
            if differ:
                raise ResumeError(
                    f"{self.cfg.out} holds a different run (differs in {', '.join(differ)}); "
                    "use another --out, or the same arguments to resume it"
                )
            return saved
        run = {"identity": ident, "preexisting_edits": await self.client.active_edits()}
        if run["preexisting_edits"] and self.cfg.require_unedited:
            raise ServerAlreadyEdited(
                f"the server has {len(run['preexisting_edits'])} edits applied "
                f"({', '.join(run['preexisting_edits'])}), and this run measures the unedited "
                "model: resume the run that made them (its pending.json undoes its edit), or "
                "undo them (editserve edits undo ID)"
            )
        if run["preexisting_edits"]:
            log.warning(
                "the server already has %d active edits: 'unedited' means the model with them",
                len(run["preexisting_edits"]),
            )
        write_json(path, run)
        return run

    def load_baseline(self) -> None:
        # Observations are per record index, so runs over more or fewer of a file's records
        # (an independent 100, a sequential 1,000) share them; older files name an n: ignored.
        def comparable(ident: dict[str, Any]) -> dict[str, Any]:
            # The split only chooses which indices: observations of an index are the same.
            skip = ("method", "sequential", "hparams", "scope", "n", "split", "records")
            return {k: v for k, v in ident.items() if k not in skip}

        meta = comparable(self.identity())
        rows = self.baseline_log.read()
        if rows and comparable(rows[0].get("meta", {})) != meta:
            raise ResumeError(
                f"{self.baseline_log.path} was measured with other data or settings; "
                "give another --baseline or remove it"
            )
        if not rows:
            self.baseline_log.append({"meta": meta})
        self.baseline = {r["index"]: r["observed"] for r in rows[1:]}

    async def measure_unedited(self) -> None:
        """Observes every record not yet in the baseline before any edit."""
        await self._observe(self.records, self.baseline, self.baseline_log, "unedited model")

    async def _observe(
        self, records: list[EvalRecord], done: dict[int, dict], log: JsonLines, desc: str
    ) -> None:
        """Observes each of `records` not in `done` on the model as it is, several at a time (the
        server decodes concurrent requests together), logging each as it finishes so that an
        interrupted pass keeps what it measured; adds them to `done`."""
        todo = [r for r in records if r.index not in done]
        bar = self._bar(len(records), desc, len(records) - len(todo))
        slots = asyncio.Semaphore(self.cfg.records_in_flight)

        async def one(record: EvalRecord) -> None:
            async with slots:
                observed = await measure(self.client, record, self.cfg.settings)
            log.append({"index": record.index, "observed": observed})
            done[record.index] = observed
            bar.update()

        await asyncio.gather(*(one(r) for r in todo))
        bar.close()

    # -- independent -----------------------------------------------------------------------------

    async def independent(self, run: dict) -> list[dict]:
        rows_log = JsonLines(self.cfg.out / "records.jsonl")
        pending = self.cfg.out / "pending.json"
        if pending.is_file():  # interrupted between POST and DELETE: undo that edit first
            await self._undo_pending(json.loads(pending.read_text()), run["preexisting_edits"])
            pending.unlink()
        done = {r["index"] for r in rows_log.read()}
        await self.measure_unedited()
        bar = self._bar(len(self.records), f"{self.cfg.method} edits", len(done & self._indices()))
        for record in self.records:
            if record.index in done:
                continue
            pre = self.baseline[record.index]
            # Before the POST: a run stopped before its reply came still knows an edit may be on.
            write_json(pending, {"index": record.index})
            try:
                edit = await self.client.post_edit(
                    self.cfg.method,
                    list(record.requests),
                    record.kind,
                    self.cfg.hparams,
                    self.cfg.scope,
                )
            except EditRefused as exc:
                pending.unlink()
                rows_log.append({"index": record.index, "error": str(exc)})
                bar.update()
                continue
            write_json(pending, {"index": record.index, "edit_id": edit["id"]})
            self.client.versions.clear()
            post = await measure(self.client, record, self.cfg.settings)
            versions = sorted(self.client.versions)
            if versions != [edit["model_version"]]:
                # Another client changed the model while this edit was scored.
                log.warning(
                    "record %d was scored on model versions %s, not only %s (its edit's)",
                    record.index,
                    versions,
                    edit["model_version"],
                )
            await self.client.delete_edit(edit["id"])
            pending.unlink()
            rows_log.append(
                {
                    "index": record.index,
                    "edit_id": edit["id"],
                    "model_version": edit["model_version"],
                    "versions": versions,
                    "timings": edit.get("timings"),
                    "pre": score(record, pre, pre),
                    "post": score(record, post, pre),
                    "observed": post,
                }
            )
            bar.update()
        bar.close()
        wanted = self._indices()
        return [r for r in rows_log.read() if r["index"] in wanted]

    async def _undo_pending(self, pending: dict, preexisting: list[str]) -> None:
        applied = await self.client.applied_edits()
        edit_id = pending.get("edit_id")
        if edit_id is None:  # stopped before the POST's reply: find the edit, if it was made
            record = next((r for r in self.records if r.index == pending["index"]), None)
            ours = [e for e in applied if e["id"] not in preexisting]
            if record and ours and _same_requests(ours[-1], record.requests):
                edit_id = ours[-1]["id"]
        if edit_id in {e["id"] for e in applied}:
            await self.client.delete_edit(edit_id)

    def _indices(self) -> set[int]:
        return {r.index for r in self.records}

    # -- sequential ------------------------------------------------------------------------------

    async def sequential(self, run: dict) -> list[dict]:
        seq_log = JsonLines(self.cfg.out / "sequence.jsonl")
        events = seq_log.read()
        edits = [e for e in events if e["event"] == "edit"]
        if any(e["event"] == "cleanup" for e in events):  # finished and undone: report only
            return [e for e in events if e["event"] == "checkpoint"]
        ours = [e["edit_id"] for e in edits if "edit_id" in e]
        expected = run["preexisting_edits"] + ours
        applied = await self.client.applied_edits()
        if lost := self._lost_reply(applied, expected, len(edits)):
            # The server applied the next edit but the run stopped before logging its reply.
            log.info("adopting edit %s: applied before the run stopped, not logged", lost["id"])
            event = {
                "event": "edit",
                "index": self.records[len(edits)].index,
                "edit_id": lost["id"],
                "model_version": lost["model_version"],
                "timings": lost.get("timings"),
                "adopted": True,
            }
            seq_log.append(event)
            edits.append(event)
            expected.append(lost["id"])
        active = [e["id"] for e in applied]
        if active != expected:
            unknown = [e for e in active if e not in expected]
            missing = [e for e in expected if e not in active]
            raise ResumeError(
                "the server's edits do not match this sequential run, so its model is not the "
                f"one the run left: unknown to the run {unknown or 'none'}, missing "
                f"{missing or 'none'}. Restore the server's journal, or undo the unknown edits "
                "(editserve edits undo ID) if they were made by the interrupted run, or start "
                "again with another --out"
            )
        await self.measure_unedited()
        done = {e["edits"] for e in events if e["event"] == "checkpoint"}
        marks = {k for k in self.cfg.checkpoints if k <= len(self.records)} | {len(self.records)}

        async def checkpoint_if_due() -> None:
            # A checkpoint scores the model right after its edit, before the next one: so an
            # interrupted checkpoint is taken again before any further edit.
            if len(edits) in marks and len(edits) not in done:
                seq_log.append(await self._checkpoint(edits))
                done.add(len(edits))

        await checkpoint_if_due()
        bar = self._bar(len(self.records), f"{self.cfg.method} sequential", len(edits))
        for record in self.records[len(edits) :]:
            try:
                edit = await self.client.post_edit(
                    self.cfg.method,
                    list(record.requests),
                    record.kind,
                    self.cfg.hparams,
                    self.cfg.scope,
                )
                event = {
                    "event": "edit",
                    "index": record.index,
                    "edit_id": edit["id"],
                    "model_version": edit["model_version"],
                    "timings": edit.get("timings"),
                }
            except EditRefused as exc:
                event = {"event": "edit", "index": record.index, "error": str(exc)}
            seq_log.append(event)
            edits.append(event)
            bar.update()
            await checkpoint_if_due()
        bar.close()
        if self.cfg.cleanup:
            for e in reversed(edits):
                if "edit_id" in e:
                    await self.client.delete_edit(e["edit_id"])
            seq_log.append({"event": "cleanup"})
        return [e for e in seq_log.read() if e["event"] == "checkpoint"]

    def _lost_reply(self, applied: list[dict], expected: list[str], made: int) -> dict | None:
        """The one applied edit past `expected` when it is this run's next edit (same requests):
        a run stopped between the server applying an edit and logging the reply leaves it."""
        if made >= len(self.records) or [e["id"] for e in applied[:-1]] != expected:
            return None
        last = applied[-1] if len(applied) == len(expected) + 1 else None
        return last if last and _same_requests(last, self.records[made].requests) else None

    async def _checkpoint(self, edits: list[dict]) -> dict:
        """Scores every record edited so far on the model as it is now."""
        by_index = {r.index: r for r in self.records}
        applied = [by_index[e["index"]] for e in edits if "edit_id" in e]
        # Observations are logged as they finish: an interrupted checkpoint resumes from them
        # (the resume check has made sure the server holds exactly this run's edits).
        part = JsonLines(self.cfg.out / f"checkpoint-{len(edits)}.jsonl")
        observed = {r["index"]: r["observed"] for r in part.read()}
        self.client.versions.clear()  # so: the versions seen by this pass
        await self._observe(applied, observed, part, f"scoring after {len(edits)} edits")
        rows = [
            {
                "index": r.index,
                "post": score(r, observed[r.index], self.baseline[r.index]),
                "pre": score(r, self.baseline[r.index], self.baseline[r.index]),
            }
            for r in applied
        ]
        return {
            "event": "checkpoint",
            "edits": len(edits),
            "applied": len(applied),
            "versions": sorted(self.client.versions),
            "edited": summarise([r["post"] for r in rows]),
            "unedited": summarise([r["pre"] for r in rows]),
            "rows": rows,
        }


def _legacy_split(saved: dict[str, Any], ident: dict[str, Any], records: list[EvalRecord]) -> None:
    """A run.json written before splits read a file's first n records: it is the same run as a
    report or all split that starts at record 0."""
    if "split" in saved or ident["split"] == "tune" or (records and records[0].index != 0):
        return
    saved["split"], saved["records"] = ident["split"], ident["records"]


def _same_requests(edit: dict[str, Any], sent: tuple[dict[str, Any], ...]) -> bool:
    """Whether a GET /edits row carries the requests this run sends for one record."""
    stored = edit.get("requests") or []
    return len(stored) == len(sent) and all(
        all(s.get(k) == r[k] for k in ("prompt", "subject", "target_new"))
        for s, r in zip(stored, sent, strict=True)
    )


async def evaluate(
    cfg: RunConfig, transport: httpx.AsyncBaseTransport | None = None
) -> dict[str, Any]:
    """Runs (or resumes) one evaluation; writes results.json and results.md; returns the former.
    `transport`: for tests, an in-process stand-in for the server."""
    client = EvalClient(
        cfg.server, cfg.api_key, cfg.admin_key, cfg.concurrency, transport=transport
    )
    try:
        await client.start()
        job = Run(cfg, client)
        run = await job.open()
        job.load_baseline()
        result: dict[str, Any] = {**run["identity"], "preexisting_edits": run["preexisting_edits"]}
        if cfg.sequential:
            checkpoints = await job.sequential(run)
            result["sequential"] = [
                {k: c[k] for k in ("edits", "applied", "edited", "unedited")} for c in checkpoints
            ]
            last = checkpoints[-1] if checkpoints else None
            result["edited"] = last["edited"] if last else None
            result["unedited"] = last["unedited"] if last else None
        else:
            rows = await job.independent(run)
            ok = [r for r in rows if "error" not in r]
            result["edited"] = summarise([r["post"] for r in ok])
            result["unedited"] = summarise([r["pre"] for r in ok])
            records = {r.index: r for r in job.records}
            pre = job.baseline
            result["probe_counts"] = {
                "edited": add_counts(
                    [probe_counts(records[r["index"]], r["observed"], pre[r["index"]]) for r in ok]
                ),
                "unedited": add_counts(
                    [
                        probe_counts(records[r["index"]], pre[r["index"]], pre[r["index"]])
                        for r in ok
                    ]
                ),
            }
            result["refused"] = [
                {"index": r["index"], "error": r["error"]} for r in rows if "error" in r
            ]
            compute = [r["timings"]["compute_s"] for r in ok if r.get("timings")]
            result["compute_s_median"] = round(statistics.median(compute), 2) if compute else None
        result["edits_applied"] = result["edited"]["reliability_tf_n"] if result["edited"] else 0
        write_json(cfg.out / "results.json", result)
        (cfg.out / "results.md").write_text(report.run_markdown(result))
        return result
    finally:
        await client.close()
