"""Prometheus metrics of the API, per model, exported on ``GET /metrics``.

Recorded by the ingress from each request's outcome and the stats the model replica
attaches to the end of every response stream. A Grafana dashboard over these series
ships in ``serve/dashboards/homefire.json``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


class ServeMetrics:
    """One registry per ingress replica (so tests and multiple apps never collide)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "homefire_requests", "Requests answered, by model, route and HTTP status.", ["model", "route", "status"],
            registry=r,
        )
        self.errors = Counter("homefire_errors", "Requests that ended in an error, by type.", ["model", "type"], registry=r)
        self.ttft = Histogram(
            "homefire_time_to_first_token_seconds", "Time from request to first token.", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "homefire_inter_token_latency_seconds", "Time between streamed chunks.", ["model"],
            buckets=_ITL_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "homefire_request_latency_seconds", "Whole-request latency.", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tokens_in = Counter("homefire_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.tokens_out = Counter("homefire_completion_tokens", "Completion tokens generated.", ["model"], registry=r)
        self.retries = Counter(
            "homefire_retries", "Requests sent again because their replica or engine died before answering.",
            ["model"], registry=r,
        )
        self.ongoing = Gauge(
            "homefire_ongoing_requests", "Requests in flight (queued or generating) at the API.", ["model"], registry=r
        )

    def observe_stats(self, model: str, stats: dict) -> None:
        self.tokens_in.labels(model).inc(stats.get("prompt_tokens", 0))
        self.tokens_out.labels(model).inc(stats.get("completion_tokens", 0))
        if stats.get("ttft_s") is not None:
            self.ttft.labels(model).observe(stats["ttft_s"])
        itl = self.itl.labels(model)
        for gap in stats.get("itl_s", ()):
            itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
