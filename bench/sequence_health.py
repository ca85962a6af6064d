"""How a model holds up along a journal of weight edits: where a sequential run collapses.

Reads a server's state folder (its journal; the server must be stopped), applies the applied
weight edits in journal order to the embedded model offline, and every `--every` edits records:
- the size of the summed ΔW of each edited matrix against its pristine weights (relative
  Frobenius norm, the largest over the matrices);
- the greedy chat answers to a few questions no edit is about, and how many still match the
  unedited model's answers.

    python bench/sequence_health.py --state results/eval/state-sequential-memit \
        --every 50 --out results/sequence_health_memit.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from harness import machine_info

from editserve.config import Settings
from editserve.edits.journal import Journal
from editserve.modelstore import load_model
from editserve.prompts import question_prompt
from methods.base import ParamDelta

QUESTIONS = (
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Which planet is closest to the Sun?",
)


def chat_answers(loaded: Any, tokens: int) -> list[str]:
    tok, model = loaded.tokenizer, loaded.model
    answers = []
    for q in QUESTIONS:
        ids = torch.tensor([question_prompt(tok, q)])
        out = model.generate(
            ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        answers.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", type=Path, required=True, help="a stopped server's state folder")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    loaded = load_model(None, Settings().cache_dir)  # EDITSERVE_CACHE_DIR, as the server reads it
    params = dict(loaded.model.named_parameters())
    journal = Journal(args.state)
    # Weight edits only, in journal order: a memory edit (GRACE, SERAC, IKE, ICE) changes no
    # weight, and its spec names its memory entries.
    rows = [r for r in journal.list(("applied",)) if "memory" not in r.spec]
    pristine: dict[str, torch.Tensor] = {}
    total: dict[str, torch.Tensor] = {}
    unedited = chat_answers(loaded, args.tokens)
    points: list[dict[str, Any]] = []

    def record(k: int) -> None:
        with torch.no_grad():
            for name, s in total.items():
                params[name].copy_((pristine[name] + s).to(params[name].dtype))
        answers = chat_answers(loaded, args.tokens)
        ratio = max((float(s.norm() / pristine[n].norm()) for n, s in total.items()), default=0.0)
        points.append(
            {
                "edits": k,
                "max_relative_delta_norm": round(ratio, 4),
                "unchanged_answers": sum(a == b for a, b in zip(answers, unedited, strict=True)),
                "answers": answers,
            }
        )
        print(
            f"{k:5d} edits  |ΣΔ|/|W| {ratio:.3f}  unchanged {points[-1]['unchanged_answers']}"
            f"/{len(QUESTIONS)}  {answers[0]!r}",
            flush=True,
        )

    record(0)
    for k, row in enumerate(rows, start=1):
        delta = ParamDelta.from_tensors(journal.load_payload(row.id))
        for name in delta.names():
            if name not in total:
                pristine[name] = params[name].detach().float().clone()
                total[name] = torch.zeros_like(pristine[name])
            total[name] += delta.matrix(name)
        if k % args.every == 0 or k == len(rows):
            record(k)
    journal.close()
    result = {
        "state": str(args.state),
        "edits": len(rows),
        "methods": sorted({r.method for r in rows}),
        "questions": list(QUESTIONS),
        "unedited_answers": unedited,
        "points": points,
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
