"""Builds the FastAPI app around a loaded engine: state, routers, error handlers, request log."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from editserve.api import routes_edits, routes_openai, routes_ops
from editserve.api.deps import AppState
from editserve.api.errors import install_error_handlers
from editserve.api.limits import BodyLimit, RateLimiter
from editserve.api.serving import OpenAIServing
from editserve.config import Settings
from editserve.edits.service import EditService
from editserve.engine.transformers_engine import TransformersEngine
from editserve.metrics import ServerMetrics

log = logging.getLogger("editserve.access")


def build_app(
    settings: Settings, engine: TransformersEngine, metrics: ServerMetrics, edits: EditService
) -> FastAPI:
    """The engine's thread starts with the app and stops with it. `edits` has replayed the
    journal already."""
    model_name = settings.served_model_name or engine.name

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="editserve", lifespan=lifespan)
    app.state.editserve = AppState(
        settings=settings,
        engine=engine,
        metrics=metrics,
        serving=OpenAIServing(
            engine, metrics, model_name, prompts=edits.prompts, scoped=edits.scoped
        ),
        edits=edits,
        edit_rate=RateLimiter(settings.edit_rate_per_minute)
        if settings.edit_rate_per_minute
        else None,
    )
    app.include_router(routes_openai.router)
    app.include_router(routes_edits.router)
    app.include_router(routes_ops.router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(AccessLog, metrics=metrics)  # outermost: logs the 413s too
    return app


class AccessLog:
    """One log line and one metrics sample per request, timed to the last byte (streams too)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            elapsed = time.monotonic() - started
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(route=path, status=str(status)).inc()
            self.metrics.request_latency.labels(route=path).observe(elapsed)
            log.info("%s %s %d %.0fms", scope["method"], scope["path"], status, elapsed * 1000)
