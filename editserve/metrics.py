"""Prometheus metrics of one server (its own registry, so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "editserve_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "editserve_request_latency_seconds",
            "Time from request to the last byte of the answer",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "editserve_time_to_first_token_seconds",
            "Time from request to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "editserve_prompt_tokens", "Prompt tokens processed", registry=r
        )
        self.generation_tokens = Counter(
            "editserve_generation_tokens", "Tokens generated", registry=r
        )
        self.batch_size = Histogram(
            "editserve_batch_size",
            "Requests decoded together, observed once per decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.memory_lookup = Histogram(
            "editserve_memory_lookup_seconds",
            "Time a chat request spends retrieving memory edits (embed, search, condition)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )
        self.scope_decision = Histogram(
            "editserve_scope_decision_seconds",
            "Time a request spends deciding which scoped edits reach it (embed, score)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )
        self.queue_depth = Gauge(
            "editserve_queue_depth", "Requests waiting to join the batch", registry=r
        )
        self.running = Gauge("editserve_running_requests", "Requests in the batch", registry=r)

    def on_step(self, batch_size: int, waiting: int) -> None:
        """Called by the engine thread once per decode step."""
        self.batch_size.observe(batch_size)

    def render(self, running: int, waiting: int) -> bytes:
        """The exposition text; the gauges are read at scrape time so an idle server shows 0."""
        self.running.set(running)
        self.queue_depth.set(waiting)
        return generate_latest(self.registry)
