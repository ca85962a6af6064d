"""Serving benchmark: editserve's streaming throughput and latency against plain `generate`.

Measures, for each concurrency level, streaming POST /v1/completions with exactly that many
requests in flight: total completion tokens per second of wall time, time to first token (p50,
p95) and the per-request decode rate. Then, with the server idle or stopped (the two would fight
over the same cores), a baseline in this process: transformers `generate` on the same model,
greedy, fp32, a forced number of new tokens, at batch 1 and 8. Prints a table and writes JSON.

Full run, starting a server itself (stopped before the baseline):

    python bench/serve.py --start

or against a server that is already running (leave it idle during the baseline):

    python bench/serve.py --server http://127.0.0.1:8000 [--api-key KEY]

Smoke: python bench/serve.py --start --concurrency 1,2 --requests 2 --max-tokens 8 \
    --baseline-tokens 8 --out /tmp/serve-smoke.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import RESULTS, ServerProcess, machine_info, percentile

TOPICS = [
    "a lighthouse keeper who finds a message in a bottle",
    "a robot learning to paint",
    "two rival bakers in a small town",
    "a dragon who is afraid of heights",
    "a detective solving a mystery on a night train",
    "a girl who can talk to trees",
    "the last library on Earth",
    "a sailor lost in a storm",
    "a cat that becomes mayor of a city",
    "an astronaut stranded on Mars",
    "a clockmaker who can stop time",
    "a village that lives inside a whale",
    "a young wizard failing his exams",
    "a musician who hears colours",
    "a knight who refuses to fight",
    "a family moving to a farm in winter",
    "a thief who steals only memories",
    "a friendship between a fox and a crow",
    "a scientist who shrinks herself by accident",
    "a haunted bookshop",
    "a journey across the desert on a camel",
    "a boy who builds a rocket in his garden",
    "a queen who loses her crown",
    "a city where it never stops raining",
    "a chef competing in a cooking contest",
    "an old map that leads to a hidden garden",
    "a pirate crew searching for a lost island",
    "a snowman that comes to life",
    "a teacher on her first day at a new school",
    "a mountain climber caught in an avalanche",
    "a mermaid who wants to walk on land",
    "a time traveller stuck in the Middle Ages",
]
STYLES = [
    "Describe every character and place in detail.",
    "Tell it slowly, with many events and dialogue.",
    "Make it at least five paragraphs long.",
    "Include a surprising twist near the end.",
]


def story_prompt(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    style = STYLES[(i // len(TOPICS)) % len(STYLES)]
    return f"Write a long story about {topic}. {style}"


def chat_prompts(tokenizer: Any, start: int, count: int) -> list[str]:
    """Story requests, rendered through the model's chat template as text."""
    from editserve.prompts import question_text

    return [question_text(tokenizer, story_prompt(start + i)) for i in range(count)]


def cache_dir() -> Path:
    return Path(os.environ.get("EDITSERVE_CACHE_DIR", "~/.cache/editserve")).expanduser()


def load_tokenizer(model_path: str | None) -> Any:
    """The served model's tokenizer alone (no weights), to chat-template the server's prompts."""
    from transformers import AutoTokenizer

    from editserve.modelstore import materialise_embedded

    folder = materialise_embedded(cache_dir()) if model_path is None else Path(model_path)
    return AutoTokenizer.from_pretrained(folder.expanduser(), local_files_only=True)


@dataclass
class RequestResult:
    ttft_s: float | None = None
    completion_tokens: int = 0
    total_s: float = 0.0
    decode_tok_s: float | None = None
    error: str | None = None


@dataclass
class Target:
    url: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)


async def stream_completion(
    client: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int
) -> RequestResult:
    body = {
        "model": target.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Every request generates exactly max_tokens, like the forced-length baseline.
        "ignore_eos": True,
    }
    result = RequestResult()
    first = last = None
    sent = time.perf_counter()
    try:
        async with client.stream(
            "POST", f"{target.url}/v1/completions", json=body, headers=target.headers
        ) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:300]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    break
                choices = chunk.get("choices")
                if choices:
                    if any(c.get("text") for c in choices):
                        now = time.perf_counter()
                        first = first if first is not None else now
                        last = now
                elif chunk.get("usage"):
                    result.completion_tokens = int(chunk["usage"]["completion_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.total_s = time.perf_counter() - sent
    if first is not None:
        result.ttft_s = first - sent
        if last is not None and last > first and result.completion_tokens > 1:
            result.decode_tok_s = (result.completion_tokens - 1) / (last - first)
    if result.error is None and result.ttft_s is None:
        result.error = "no text in the stream"
    return result


async def run_level(
    client: httpx.AsyncClient,
    target: Target,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
) -> dict[str, Any]:
    """All `prompts` through `concurrency` workers, so exactly that many are in flight."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestResult] = []

    async def worker() -> None:
        while True:
            try:
                prompt = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await stream_completion(client, target, prompt, max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start

    ok = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    rates = [r.decode_tok_s for r in ok if r.decode_tok_s is not None]
    level: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "completion_tokens": tokens,
        "mean_completion_tokens": round(tokens / len(ok), 1) if ok else None,
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_ms": round(percentile(ttfts, 50), 1) if ttfts else None,
        "ttft_p95_ms": round(percentile(ttfts, 95), 1) if ttfts else None,
        "decode_tok_s_per_request_median": round(statistics.median(rates), 2) if rates else None,
    }
    errors = [r.error for r in results if r.error is not None]
    if errors:
        level["first_error"] = errors[0]
    return level


async def bench_server(
    url: str,
    api_key: str | None,
    levels: list[int],
    requests_per_level: int | None,
    max_tokens: int,
    tokenizer: Any | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels))
    timeout = httpx.Timeout(30.0, read=600.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        resp = await client.get(f"{url}/v1/models", headers=headers)
        resp.raise_for_status()
        target = Target(url=url, model=resp.json()["data"][0]["id"], headers=headers)

        def prompts(start: int, count: int) -> list[str]:
            if tokenizer is not None:
                return chat_prompts(tokenizer, start, count)
            return [story_prompt(start + i) for i in range(count)]

        warm = await stream_completion(client, target, prompts(len(TOPICS) - 1, 1)[0], max_tokens)
        if warm.error:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        results = []
        for c in levels:
            # Fewer requests than workers would leave fewer than `c` in flight.
            n = max(requests_per_level, c) if requests_per_level else max(2 * c, 4)
            level = await run_level(client, target, prompts(0, n), c, max_tokens)
            results.append(level)
            print(
                f"  c={c:<3} {level['requests']} requests, {level['throughput_tok_s']} tok/s, "
                f"TTFT p50 {level['ttft_p50_ms']} ms",
                flush=True,
            )
    info = {"url": url, "model": target.model, "prompt_format": "chat" if tokenizer else "raw"}
    return info, results


# -- baseline --------------------------------------------------------------------------------------


def bench_generate(
    model_path: str | None, batches: list[int], new_tokens: int
) -> list[dict[str, Any]]:
    """transformers `generate`, greedy, fp32, exactly `new_tokens` per row, all cores."""
    import torch

    from editserve.modelstore import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_model(model_path, cache_dir(), dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "left"

    def generate(batch: int, tokens: int) -> float:
        enc = tokenizer(
            chat_prompts(tokenizer, 0, batch),
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        seconds = time.perf_counter() - start
        produced = out.shape[1] - enc["input_ids"].shape[1]
        if produced != tokens:
            raise RuntimeError(f"generate produced {produced} tokens, not {tokens}")
        return seconds

    for batch in batches:  # warm-up, a few tokens at each batch size (padded paths included)
        generate(batch, min(4, new_tokens))
    results = []
    for batch in batches:
        seconds = generate(batch, new_tokens)
        results.append(
            {
                "batch": batch,
                "new_tokens": new_tokens,
                "tokens_per_s": round(batch * new_tokens / seconds, 2),
                "seconds": round(seconds, 3),
            }
        )
        print(f"  generate b={batch:<2} {results[-1]['tokens_per_s']} tok/s", flush=True)
    return results


# -- report ----------------------------------------------------------------------------------------


def summarise(levels: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
    by_c = {lv["concurrency"]: lv for lv in levels}
    by_b = {b["batch"]: b for b in baseline}
    summary: dict[str, Any] = {}
    goals: dict[str, bool] = {}
    c8, b8 = by_c.get(8), by_b.get(8)
    if c8 and b8 and c8["throughput_tok_s"] and b8["tokens_per_s"]:
        ratio = c8["throughput_tok_s"] / b8["tokens_per_s"]
        summary["throughput_c8_over_generate_b8"] = round(ratio, 3)
        goals["c8_at_least_2x_generate_b8"] = ratio >= 2.0
    c1 = by_c.get(1)
    if c1 and c1["ttft_p50_ms"] is not None:
        summary["ttft_p50_ms_c1"] = c1["ttft_p50_ms"]
        goals["ttft_p50_c1_under_150ms"] = c1["ttft_p50_ms"] < 150.0
    if goals:
        summary["goals"] = goals
    return summary


def print_table(report: dict[str, Any]) -> None:
    if report.get("levels"):
        print(f"\nserver {report['server']['url']} ({report['server']['model']})")
        print(
            f"{'conc':>5} {'reqs':>5} {'tokens':>7} {'wall s':>8} {'tok/s':>8} "
            f"{'TTFT p50':>9} {'TTFT p95':>9} {'decode/req':>10} {'err':>4}"
        )
        for lv in report["levels"]:
            print(
                f"{lv['concurrency']:>5} {lv['requests']:>5} {lv['completion_tokens']:>7} "
                f"{lv['wall_s']:>8} {lv['throughput_tok_s']!s:>8} {lv['ttft_p50_ms']!s:>9} "
                f"{lv['ttft_p95_ms']!s:>9} {lv['decode_tok_s_per_request_median']!s:>10} "
                f"{lv['errors']:>4}"
            )
    if report.get("baseline"):
        print("\ntransformers generate (fp32, greedy, forced length)")
        print(f"{'batch':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
        for b in report["baseline"]:
            print(
                f"{b['batch']:>5} {b['batch'] * b['new_tokens']:>7} {b['seconds']:>8} "
                f"{b['tokens_per_s']:>8}"
            )
    if report.get("summary"):
        print("\nsummary: " + json.dumps(report["summary"]))


def int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8,32, not {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default="http://127.0.0.1:8000", help="a running server")
    where.add_argument("--start", action="store_true", help="start a server here and stop it")
    p.add_argument("--api-key", default=os.environ.get("EDITSERVE_API_KEY"))
    p.add_argument("--model", help="local HF folder served (default: the embedded model)")
    p.add_argument("--concurrency", type=int_list, default=[1, 8, 32], help="e.g. 1,8,32")
    p.add_argument(
        "--requests-per-level",
        "--requests",
        type=int,
        dest="requests",
        help="requests per level, at least the concurrency (default: 2 x concurrency, at least 4)",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--raw-prompts",
        action="store_true",
        help="send plain prompts, not chat-templated ones (no local tokenizer needed)",
    )
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--baseline-batches", type=int_list, default=[1, 8])
    p.add_argument("--baseline-tokens", type=int, default=128)
    p.add_argument(
        "--out", type=Path, default=RESULTS / "serve.json"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tokenizer = None if args.raw_prompts else load_tokenizer(args.model)
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "baseline_tokens": args.baseline_tokens if args.baseline else None,
        },
    }

    server = ServerProcess(args.model, args.api_key) if args.start else None
    try:
        url = args.server.rstrip("/")
        if server is not None:
            print(f"starting a server on {server.url} ...", flush=True)
            server.wait_ready()
            url = server.url
        print(f"server levels {args.concurrency}", flush=True)
        info, levels = asyncio.run(
            bench_server(
                url, args.api_key, args.concurrency, args.requests, args.max_tokens, tokenizer
            )
        )
        report["server"] = {**info, "started_by_bench": server is not None}
        report["levels"] = levels
    finally:
        if server is not None:
            server.stop()  # before the baseline: the two would compete for the cores

    if args.baseline:
        print(f"baseline generate, batches {args.baseline_batches}", flush=True)
        report["baseline"] = bench_generate(args.model, args.baseline_batches, args.baseline_tokens)
    report["machine"] = machine_info()
    report["summary"] = summarise(report["levels"], report.get("baseline", []))

    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
