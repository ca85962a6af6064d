"""`editserve` command line. `serve` composes settings, model, engine and app, then runs uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from editserve import client_cli, scope_cli
from editserve.config import ConfigError, Settings
from editserve.eval import cli as eval_cli
from methods.hparams import MissingDefaults

log = logging.getLogger("editserve")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible API")
    p.add_argument("--config", help="YAML settings file (also EDITSERVE_CONFIG)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000; also EDITSERVE_PORT)")
    p.add_argument("--model", help="local Hugging Face folder (default: the embedded SmolLM2)")
    p.add_argument("--served-model-name", help="the model id clients send (default: folder name)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-batch", type=int, help="requests decoded together (default 32)")
    p.add_argument("--max-model-len", type=int, help="cap on prompt + completion tokens")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--forwarded-allow-ips",
        help="proxies whose X-Forwarded-For is trusted, comma-separated (default: none)",
    )
    p.set_defaults(run=serve)


def build_server(settings: Settings):  # noqa: ANN201 (FastAPI; imported lazily for a fast --help)
    import torch

    from editserve.api.app import build_app
    from editserve.edits.journal import Journal
    from editserve.edits.service import EditService
    from editserve.engine.transformers_engine import TransformersEngine
    from editserve.metrics import ServerMetrics
    from editserve.modelstore import load_model
    from editserve.threads import release_thread_team
    from memory.encoder import SentenceEncoder
    from memory.scope import ScopeClassifier
    from methods.stats import StatsCache, StatsSource

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = settings.resolved_device()
    loaded = load_model(settings.model, settings.cache_dir, settings.dtype, device)
    metrics = ServerMetrics()
    engine = TransformersEngine.from_settings(loaded, settings, on_step=metrics.on_step)
    log.info(
        "model %s (%s, %s, %s), context %d tokens, KV cache %d MiB (%d tokens)",
        settings.served_model_name or loaded.name,
        loaded.source,
        device,
        str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        engine.max_model_len,
        engine.kv_cache_bytes >> 20,
        engine.limits.kv_budget_tokens,
    )
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    stats = StatsSource(
        corpus=str(settings.stats_corpus) if settings.stats_corpus else None,
        n_tokens=settings.stats_tokens,
    )
    encoder = SentenceEncoder(
        settings.memory_encoder_dir,
        quantize=settings.memory_encoder == "int8",
        runtime=settings.memory_encoder_runtime,
        threads=settings.memory_encoder_threads,
    )
    scope = ScopeClassifier.load(settings.serac_scope) if settings.serac_scope else None
    if scope is not None:
        log.info("SERAC scope: %s (threshold %.2f)", settings.serac_scope, scope.threshold)
        trained_on = scope.info.get("encoder", settings.memory_encoder)
        if trained_on != settings.memory_encoder:
            log.warning(
                "the SERAC scope classifier saw %s embeddings and the encoder serves %s ones: "
                "its threshold may not hold",
                trained_on,
                settings.memory_encoder,
            )
    edits = EditService(
        engine,
        Journal(settings.state_dir),
        StatsCache(settings.cache_dir / "stats"),
        stats,
        encoder,
        scope,
    )
    log_unavailable_methods(edits.memory.unavailable())  # before replay, which leaves them out
    edits.replay()
    if settings.stats_at_start:
        edits.start_statistics()  # on pristine weights, while the server serves
    release_thread_team()  # loading is done: this thread's OpenMP team goes (editserve.threads)
    return build_app(settings, engine, metrics, edits)


def log_unavailable_methods(unavailable: dict[str, str]) -> None:
    """One line for the methods an optional package's absence disables (their edits answer 503),
    grouped by what is missing."""
    by_reason: dict[str, list[str]] = {}
    for method, why in unavailable.items():
        by_reason.setdefault(why, []).append(method)
    for why, methods in by_reason.items():
        log.warning("%s disabled (their edits answer 503): %s", ", ".join(methods), why)


def _stats_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats", help="precompute the second-moment statistics MEMIT and AlphaEdit use"
    )
    p.add_argument("--config", help="YAML settings file (also EDITSERVE_CONFIG)")
    p.add_argument("--model", help="local Hugging Face folder (default: the embedded SmolLM2)")
    p.add_argument("--corpus", help="text file (default: text sampled from the model)")
    p.add_argument("--tokens", type=int, help="tokens to average over (default 20000)")
    p.add_argument("--layers", help="comma-separated layers (default: MEMIT's and AlphaEdit's)")
    p.set_defaults(run=stats)


def stats_layers(config) -> list[int]:  # noqa: ANN001 (a transformers config)
    """The layers MEMIT and AlphaEdit edit on this model by default."""
    from editserve.edits.statistics import default_layers

    return default_layers(config.model_type, config.num_hidden_layers)


def stats_context(loaded):  # noqa: ANN001, ANN201 (LoadedModel -> EditContext; lazy imports)
    """What computing statistics needs of a loaded model (no chat prompts, no edits)."""
    from editserve.edits.journal import fingerprint
    from methods.architectures import resolve
    from methods.base import EditContext

    return EditContext(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        arch=resolve(loaded.model),
        chat_prompt=lambda q: [],
        model_fingerprint=fingerprint(loaded.model),
    )


def stats(args: argparse.Namespace) -> int:
    """Computes (or finds cached) the statistics the server would compute on first use."""
    import time

    from editserve.modelstore import load_model
    from methods.stats import StatsCache, StatsSource

    settings = Settings.load(
        args.config, model=args.model, stats_corpus=args.corpus, stats_tokens=args.tokens
    )
    loaded = load_model(settings.model, settings.cache_dir, settings.dtype, "cpu")
    if args.layers:
        layers = sorted({int(x) for x in args.layers.split(",")})
    else:
        layers = stats_layers(loaded.model.config)
    source = StatsSource(
        corpus=str(settings.stats_corpus) if settings.stats_corpus else None,
        n_tokens=settings.stats_tokens,
    )
    ctx = stats_context(loaded)
    cache = StatsCache(settings.cache_dir / "stats")
    started = time.monotonic()
    cache.get(ctx, source, layers)
    print(
        f"statistics of layers {layers} from {source.tag} in "
        f"{time.monotonic() - started:.1f} s: {cache.path(ctx.model_fingerprint, source, 0).parent}"
    )
    return 0


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings.load(
        args.config,
        host=args.host,
        port=args.port,
        model=args.model,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        device=args.device,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        threads=args.threads,
        log_level=args.log_level,
        forwarded_allow_ips=args.forwarded_allow_ips,
    )
    logging.getLogger().setLevel(settings.log_level.upper())
    app = build_server(settings)
    log.info("serving on http://%s:%d/v1", settings.host, settings.port)
    warn_if_edits_open(settings)
    uvicorn.run(app, **uvicorn_options(settings))
    return 0


def warn_if_edits_open(settings: Settings) -> None:
    if settings.admin_key is None:
        log.warning(
            "EDITSERVE_ADMIN_KEY is unset: edits are open to every loopback client (behind a "
            "same-host proxy or port-forward, that is every client of it); set an admin key "
            "unless only trusted users can reach this machine"
        )


def uvicorn_options(settings: Settings) -> dict:
    """uvicorn's settings for `serve`. Forwarded headers are trusted only from the configured
    proxies: uvicorn's own default trusts them from 127.0.0.1, which makes any client of a
    same-host proxy or port-forward look local to the loopback-only edit routes."""
    trusted = settings.forwarded_allow_ips.strip()
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted or None,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(prog="editserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _stats_parser(sub)
    client_cli.add_parsers(sub)
    eval_cli.add_parser(sub)
    scope_cli.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    # MissingDefaults: an install without the method configs says so in one line, no traceback.
    except (ConfigError, ValidationError, FileNotFoundError, ValueError, MissingDefaults) as exc:
        print(f"editserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
