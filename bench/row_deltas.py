"""What scoped row deltas cost a decode step, in process on the embedded model (or --model).

One batch of greedy requests, timed per decode step (between the engine's step observer calls,
sampling and streaming included), in four settings:
- `none`: no row delta anywhere (the hooks are not even installed);
- `registered_out_of_scope`: 1,000 rank-one deltas registered, spread over every layer's
  down-projection (every one hooked), none carried by any row: the hooks' early return;
- `all_rows_one_delta`: every row carries the same delta (one product per step and layer it
  touches);
- `each_row_its_own`: every row carries a delta of its own (one product per row).
Settings run in turn, `--repeats` times, so that drift on a shared machine hits each alike; the
medians are over every timed step. The goal: the registered-out-of-scope median within noise of
`none`.

A shared machine's noise can hide a small cost, so the hooks' early return is also timed alone:
one-token forwards of the decoder at the batch size (no cache), alternating between no hooks and
the 1,000 deltas' hooks with no row in scope, `--forwards` of each (`decoder_forward_ms`).

    python bench/row_deltas.py [--model DIR] [--device cpu] [--batch 8] [--tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))

from harness import RESULTS, machine_info, percentile, write_report  # noqa: E402

from editserve.engine.request import OutputStream  # noqa: E402
from editserve.engine.row_deltas import RowDelta, RowDeltaHooks  # noqa: E402
from editserve.engine.sampling import SamplingParams  # noqa: E402
from editserve.engine.transformers_engine import TransformersEngine  # noqa: E402
from editserve.modelstore import load_model  # noqa: E402
from methods.architectures import resolve  # noqa: E402

QUESTIONS = (
    "What is the capital of France?",
    "Who painted the Mona Lisa?",
    "How do I boil an egg?",
    "Name a prime number larger than ten.",
)


class StepClock:
    """The engine's step observer: when each decode step of a full batch began."""

    def __init__(self) -> None:
        self.batch = 0
        self.stamps: list[float] = []

    def __call__(self, batch: int, _waiting: int) -> None:
        if batch == self.batch:
            self.stamps.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        return [(b - a) * 1000 for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def random_deltas(engine: TransformersEngine, count: int, seed: int) -> list[RowDelta]:
    """Rank-one deltas on the down-projections, layer after layer, in the model's dtype."""
    arch = resolve(engine.model)
    weight = next(engine.model.parameters())
    generator = torch.Generator().manual_seed(seed)
    deltas = []
    for i in range(count):
        layer = i % arch.num_layers
        module = arch.down_proj_name(layer).rpartition(".")[0]
        shape = arch.down_proj(layer).weight.shape
        d_in, d_out = (shape[0], shape[1]) if arch.spec.weight_is_transposed else shape[::-1]
        down = torch.randn(d_in, 1, generator=generator) * 0.01
        up = torch.randn(1, d_out, generator=generator) * 0.01
        factors = {module: (down.to(weight), up.to(weight))}
        deltas.append(RowDelta(factors, label=f"bench-{i}"))
    return deltas


def run_batch(
    engine: TransformersEngine,
    clock: StepClock,
    prompts: list[list[int]],
    per_row: list[tuple[RowDelta, ...]],
    tokens: int,
) -> list[float]:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def go() -> None:
        stream = OutputStream()
        engine.submit_group([(p, params) for p in prompts], stream, row_deltas=per_row)
        await stream.results()

    clock.batch, clock.stamps = len(prompts), []
    asyncio.run(go())
    return clock.step_ms()


def forward_ab(
    engine: TransformersEngine, registered: list[RowDelta], batch: int, rounds: int
) -> dict[str, list[float]]:
    """Decoder forwards without hooks and with every registered delta's hooks, alternating, as
    the engine runs them (in `for_rows`, no row in scope). Call with the engine stopped."""
    decoder = engine.model.base_model
    hooks = RowDeltaHooks(engine.model, decoder)
    ids = torch.full((batch, 1), 42, device=engine.device)
    nobody: list[tuple[RowDelta, ...]] = [()] * batch
    times: dict[str, list[float]] = {"no_hooks": [], "hooked_out_of_scope": []}
    with torch.inference_mode():
        decoder(input_ids=ids, use_cache=False)  # warm-up
        for _ in range(rounds):
            for name in times:
                live = name == "hooked_out_of_scope"
                for delta in registered if live else ():
                    hooks.register(delta)
                started = time.perf_counter()
                with hooks.for_rows(nobody, whole_batch=True):
                    decoder(input_ids=ids, use_cache=False)
                _synchronize(engine.device)
                times[name].append((time.perf_counter() - started) * 1000)
                for delta in registered if live else ():
                    hooks.unregister(delta)
                hooks.prune()
    return times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    reference = statistics.median(times[base])
    return {
        name: {
            "count": len(ms),
            "min": round(min(ms), 3),  # the least disturbed one, on a shared machine
            "median": round(statistics.median(ms), 3),
            "p90": round(percentile(ms, 90), 3),
            f"vs_{base}": round(statistics.median(ms) / reference, 3),
        }
        for name, ms in times.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local HF folder (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="generated per request")
    parser.add_argument("--registered", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forwards", type=int, default=200, help="decoder forwards per setting")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=RESULTS / "row_deltas.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cache = Path(os.environ.get("EDITSERVE_CACHE_DIR", "~/.cache/editserve")).expanduser()
    loaded = load_model(args.model, cache, dtype=args.dtype, device=args.device)
    clock = StepClock()
    engine = TransformersEngine(loaded, max_batch=args.batch, on_step=clock)
    chats = [
        [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(args.batch)
    ]
    render = loaded.tokenizer.apply_chat_template
    prompts = [list(render(c, add_generation_prompt=True, return_dict=False)) for c in chats]
    registered = random_deltas(engine, args.registered, seed=0)
    shared = random_deltas(engine, 1, seed=1)[0]
    own = random_deltas(engine, args.batch, seed=2)
    settings: dict[str, list[tuple[RowDelta, ...]]] = {
        "none": [()] * args.batch,
        "registered_out_of_scope": [()] * args.batch,
        "all_rows_one_delta": [(shared,)] * args.batch,
        "each_row_its_own": [(d,) for d in own],
    }
    times: dict[str, list[float]] = {name: [] for name in settings}
    engine.start()
    try:
        run_batch(engine, clock, prompts, settings["none"], 8)  # warm-up: caches, allocator
        for _ in range(args.repeats):
            for name, per_row in settings.items():
                live = name == "registered_out_of_scope"
                for delta in registered if live else ():
                    engine.register_row_delta(delta).result()
                times[name] += run_batch(engine, clock, prompts, per_row, args.tokens)
                for delta in registered if live else ():
                    engine.unregister_row_delta(delta).result()
    finally:
        engine.stop()
    forwards = forward_ab(engine, registered, args.batch, args.forwards)

    report: dict[str, Any] = {
        "model": loaded.name,
        "device": args.device,
        "dtype": str(next(loaded.model.parameters()).dtype),
        "batch": args.batch,
        "tokens_per_request": args.tokens,
        "registered_deltas": args.registered,
        "repeats": args.repeats,
        "machine": machine_info(),
        "decode_step_ms": summary(times, "none"),
        "decoder_forward_ms": summary(forwards, "no_hooks"),
    }
    for part in ("decode_step_ms", "decoder_forward_ms"):
        for name, row in report[part].items():
            ratio = next(v for k, v in row.items() if k.startswith("vs_"))
            print(
                f"{part} {name:>24}: median {row['median']:.2f} ({ratio:.2f}x), "
                f"min {row['min']:.2f}"
            )
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
