"""Operational routes: /health and /metrics (open, no key: probes and scrapers call them)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from editserve.api.deps import StateDep

router = APIRouter()


@router.get("/health")
async def health(state: StateDep) -> dict:
    engine = state.engine
    return {
        "status": "ok",
        "model": state.serving.model_name,
        "model_version": engine.model_version,
        "running": engine.num_running,
        "waiting": engine.num_waiting,
        # Journaled edits refused at start (damaged payload): serving goes on without them.
        "edits_not_replayed": sorted(state.edits.unreplayed),
        # MEMIT's and AlphaEdit's statistics: idle, computing (done/total tokens), ready, failed.
        "stats": stats.status() if (stats := state.edits.statistics) else {"state": "off"},
    }


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    body = state.metrics.render(running=state.engine.num_running, waiting=state.engine.num_waiting)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
