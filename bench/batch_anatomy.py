"""Inside MEMIT and AlphaEdit edits, in-process on the embedded model: where the time goes, and
where the answers are lost. Writes JSON.

bench/batch_edits.py measures edits as users meet them, through the server. This one opens the
edit up, on a workbench of the model as `EditService` builds it:
- the time of the two stages (targets: the δ optimisation; spread: the per-layer solves), the
  steps each request took and how many met the stop rule;
- greedy chat answers after the edit (success, paraphrase, 40 unrelated questions, one
  same-subject question per record), the same measures as bench/batch_edits.py;
- the mean relative change ‖ΔW k‖ / ‖W k‖ of the edited layers' outputs over every position of a
  few unrelated chats: how broadly the update acts;
- `--batch B`: batches of B kept in sequence (AlphaEdit protects the earlier ones' keys). After
  each, besides the curve (in chat, and teacher-forced: target token accuracy, and argmax
  agreement along the unedited answers to the unrelated questions): how far the first batch's
  residual stream at its subjects (after the last edited layer) moved, relative to how far its
  own edit moved it, and its success when that residual is patched back to where its edit left
  it. If patching restores the first batch's answers, earlier facts fade at their subjects; if
  not, elsewhere in their prompts.

Records come from the tuning split (ZsRE dev records from 100 on, `--first-record`); the
reporting split's first 100 are refused unless `--force-report-records`.

    python bench/batch_anatomy.py --method memit --n 100
    python bench/batch_anatomy.py --method memit --n 100 --hparams '{"n_essence": 1}'
    python bench/batch_anatomy.py --method alphaedit --n 150 --batch 50
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from edits import (
    DATA,
    UNRELATED,
    add_records_arguments,
    load_records,
    own_questions,
    target_hits,
    unchanged,
)
from harness import RESULTS, machine_info, write_report

from editserve.edits.journal import fingerprint
from editserve.eval.metrics import agreement, mean
from editserve.modelstore import load_model
from editserve.prompts import question_prompt
from methods.alphaedit import alphaedit_solver, load_alphaedit_hparams, protected_grams
from methods.architectures import resolve
from methods.base import EditContext, EditRequest, ParamDelta
from methods.common import chat_sequence, collect_keys
from methods.memit import compute_targets, load_memit_hparams, memit_solver, probe, spread
from methods.stats import StatsCache, StatsSource
from methods.workbench import make_workbench

ANSWER_TOKENS = 24
LOCALITY_TOKENS = 16
BREADTH_CHATS = (
    "What is the capital of France?",
    "Who painted the Mona Lisa?",
    "How do I boil an egg?",
)


class Workbench:
    """The embedded model, an EditContext over it as the server builds one, and greedy chat."""

    def __init__(self, cache_dir: Path) -> None:
        loaded = load_model(None, cache_dir)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        bench = make_workbench(self.model)
        self.edited: dict[str, list[torch.Tensor]] = {}  # keys of the edits applied so far
        self.requests: list[EditRequest] = []  # and their requests
        self.ctx = EditContext(
            model=bench,
            tokenizer=self.tokenizer,
            arch=resolve(bench),
            chat_prompt=self.chat_prompt,
            model_fingerprint=fingerprint(self.model),
            edited_keys=self.edited_keys,
            edited_requests=lambda: list(self.requests),
        )
        cache, moments = StatsCache(cache_dir / "stats"), {}

        def second_moments(layers: list[int]) -> dict[int, torch.Tensor]:
            missing = [layer for layer in layers if layer not in moments]
            moments.update(cache.get(self.ctx, StatsSource(), missing) if missing else {})
            return {layer: moments[layer] for layer in layers}

        self.ctx.second_moments = second_moments

    def chat_prompt(self, question: str) -> list[int]:
        return question_prompt(self.tokenizer, question)

    def edited_keys(self, name: str) -> torch.Tensor:
        keys = self.edited.get(name)
        width = self.ctx.arch.down_proj(0).weight.shape[1]
        return torch.cat(keys) if keys else torch.zeros(0, width)

    def answers(self, questions: list[str], tokens: int, model: Any = None) -> list[str]:
        out = []
        for question in questions:
            prompt = self.chat_prompt(question)
            with torch.no_grad():
                ids = (model or self.model).generate(
                    torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False
                )
            out.append(self.tokenizer.decode(ids[0, len(prompt) :], skip_special_tokens=True))
        return out

    def forced(self, questions: list[str], continuations: list[str]) -> list[tuple[list, list]]:
        """Per question: the continuation's tokens after its chat prompt, and the model's argmax
        at each of them (teacher-forced, one forward each)."""
        out = []
        for question, text in zip(questions, continuations, strict=True):
            prompt = self.chat_prompt(question)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = self.model(torch.tensor([prompt + ids])).logits[0]
            out.append(
                (ids, logits[len(prompt) - 1 : len(prompt) + len(ids) - 1].argmax(-1).tolist())
            )
        return out

    def apply(self, delta: ParamDelta, requests: list[EditRequest]) -> None:
        self.requests += requests
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in delta.names():
                params[name] += delta.matrix(name).to(params[name])
        for name, keys in delta.keys.items():
            self.edited.setdefault(name, []).append(keys)

    def breadth(self, delta: ParamDelta) -> float:
        """Mean ‖ΔW k‖ / ‖W k‖ over the edited layers and every position of a few chats."""
        ratios = []
        params = dict(self.model.named_parameters())
        for layer in range(len(self.ctx.arch.layers)):
            name = self.ctx.arch.down_proj_name(layer)
            if name not in delta.names():
                continue
            change, weight = delta.matrix(name), params[name].detach()
            for question in BREADTH_CHATS:
                k = collect_keys(self.ctx, layer, [self.chat_prompt(question)])[0]
                ratios.append(
                    float(((k @ change.T).norm(dim=1) / (k @ weight.T).norm(dim=1)).mean())
                )
        return mean(ratios)


def as_requests(records: list[dict]) -> list[EditRequest]:
    return [EditRequest(r["prompt"], r["subject"], r["target_new"]) for r in records]


def hparams(bench: Workbench, method: str, overrides: dict) -> Any:
    """The method's hyperparameters for the embedded model, with `overrides`."""
    config = bench.model.config
    load = load_memit_hparams if method == "memit" else load_alphaedit_hparams
    return load(config.model_type, config.num_hidden_layers, overrides)


def edit(
    bench: Workbench, method: str, records: list[dict], overrides: dict
) -> tuple[ParamDelta, dict]:
    """One edit of `records`, its stages timed."""
    ctx, h = bench.ctx, hparams(bench, method, overrides)
    requests = as_requests(records)
    layers = tuple(h.layers or ())
    moments = ctx.second_moments(layers)  # loaded before the clock starts
    started = time.perf_counter()
    if method == "memit":
        solver = memit_solver(h)
    else:  # AlphaEdit's keys of the earlier edits' prompts, with protect_prompts
        solver = alphaedit_solver(ctx, h, protected_grams(ctx, h))
    protect_s = time.perf_counter() - started
    targets = compute_targets(ctx, requests, h)
    targets_s = time.perf_counter() - started - protect_s
    delta = spread(ctx, targets, layers, solver(moments))
    return delta, {
        "protect_s": round(protect_s, 1),
        "targets_s": round(targets_s, 1),
        "spread_s": round(time.perf_counter() - started - protect_s - targets_s, 1),
        "steps_total": sum(targets.steps),
        "steps_median": sorted(targets.steps)[len(targets.steps) // 2],
        "targets_reached": sum(targets.reached),
    }


def one_batch(
    bench: Workbench, args: argparse.Namespace, records: list[dict], probes: list[str]
) -> dict:
    own = own_questions(records)
    probes_before = bench.answers(probes, LOCALITY_TOKENS)
    own_before = bench.answers(own, LOCALITY_TOKENS)
    delta, out = edit(bench, args.method, records, args.hparams)
    out["breadth"] = round(bench.breadth(delta), 4)
    bench.apply(delta, as_requests(records))
    out["success"] = mean(
        target_hits(records, bench.answers([r["prompt"] for r in records], ANSWER_TOKENS))
    )
    rephrased = bench.answers([r["rephrase_prompt"] for r in records], ANSWER_TOKENS)
    out["paraphrase"] = mean(target_hits(records, rephrased))
    after = bench.answers(probes, LOCALITY_TOKENS)
    out["locality"] = unchanged(probes_before, after)
    out["same_subject_unchanged"] = unchanged(own_before, bench.answers(own, LOCALITY_TOKENS))
    return out


def sequential(
    bench: Workbench, args: argparse.Namespace, records: list[dict], probes: list[str]
) -> list[dict]:
    ctx, first = bench.ctx, records[: args.batch]
    last = max(hparams(bench, args.method, args.hparams).layers or ())
    first_seqs = [chat_sequence(ctx, r["prompt"], r["subject"]) for r in first]

    def residual() -> torch.Tensor:  # the first batch's residual at its subjects after `last`
        return probe(ctx, first_seqs, (), last)[1]

    unedited, written = residual(), None
    probes_before = bench.answers(probes, LOCALITY_TOKENS)
    # Locality TF (KnowEdit's): agreement of the argmax along the unedited answers, before/after.
    argmax_before = [a for _, a in bench.forced(probes, probes_before)]
    curve = []
    for start in range(0, len(records), args.batch):
        batch = records[start : start + args.batch]
        delta, point = edit(bench, args.method, batch, args.hparams)
        bench.apply(delta, as_requests(batch))
        done = records[: start + args.batch]
        got = target_hits(done, bench.answers([r["prompt"] for r in done], ANSWER_TOKENS))
        after = bench.answers(probes, LOCALITY_TOKENS)
        argmax_after = [a for _, a in bench.forced(probes, probes_before)]
        forced = bench.forced([r["prompt"] for r in done], [r["target_new"].strip() for r in done])
        point |= {
            "efficacy_tf": round(mean([agreement(ids, top) for ids, top in forced]), 4),
            "locality_tf": round(
                mean([agreement(b, a) for b, a in zip(argmax_before, argmax_after, strict=True)]),
                4,
            ),
            "edits": len(done),
            "efficacy": mean(got),
            "newest": mean(got[start:]),
            "first_batch": mean(got[: args.batch]),
            "locality": unchanged(probes_before, after),
        }
        now = residual()
        if written is None:
            written = now
        else:
            moved = (now - written).norm(dim=1) / (written - unedited).norm(dim=1)
            point["first_batch_residual_moved"] = round(float(moved.median()), 4)
            point["first_batch_patched"] = mean(
                patched_hits(bench, first, first_seqs, last, written)
            )
        curve.append(point)
        print(point, flush=True)
    return curve


def patched_hits(
    bench: Workbench, records: list[dict], seqs: list, layer: int, residual: torch.Tensor
) -> list[bool]:
    """Greedy answers with the residual after `layer` at each subject set to `residual`."""
    out = []
    for i, (record, seq) in enumerate(zip(records, seqs, strict=True)):

        def patch(_: Any, __: Any, output: Any, i: int = i, at: int = seq.subject_pos) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] <= at:  # a decoding step, after the prompt
                return output
            hidden = hidden.clone()
            hidden[0, at] = residual[i].to(hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = bench.ctx.arch.layers[layer].register_forward_hook(patch)
        try:
            answer = bench.answers([record["prompt"]], ANSWER_TOKENS, model=bench.ctx.model)
        finally:
            handle.remove()
        out += target_hits([record], answer)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["memit", "alphaedit"], default="memit")
    parser.add_argument("--n", type=int, default=100, help="ZsRE dev records edited")
    parser.add_argument("--batch", type=int, default=0, help="sequential batches of this size")
    parser.add_argument("--hparams", type=json.loads, default={}, help="overrides, as JSON")
    parser.add_argument("--data", type=Path, default=DATA)
    add_records_arguments(parser)  # the tuning split by default: this script chose settings
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "batch_anatomy.json"
    )
    args = parser.parse_args()
    records = load_records(args.n, args.data, args.first_record, args.force_report_records)
    probes = UNRELATED + [r["prompt"] for r in load_records(30, args.data, 600)]
    bench = Workbench(
        Path(os.environ.get("EDITSERVE_CACHE_DIR", "~/.cache/editserve")).expanduser()
    )
    report: dict[str, Any] = {
        "machine": machine_info(),
        "args": vars(args) | {"data": str(args.data)},
    }
    if args.batch:
        report["sequential"] = sequential(bench, args, records, probes)
    else:
        report["batch"] = one_batch(bench, args, records, probes)
        print(report["batch"])
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
