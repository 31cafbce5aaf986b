"""Prometheus metrics for the server (one registry per app, so tests can build several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moa.engine import Generation
from moa.runner import RunResult

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moa_requests", "Requests by model and HTTP status", ["model", "status"], registry=r)
        self.latency = Histogram("moa_request_latency_seconds", "End-to-end latency", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("moa_ttft_seconds", "Time to the first answer token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("moa_tokens", "Tokens over all engine calls", ["model", "kind"], registry=r)
        self.engine_calls = Counter("moa_engine_calls", "Engine calls made for requests", ["engine", "status"],
                                    registry=r)
        self.in_flight = Gauge("moa_requests_in_flight", "Requests being served", registry=r)
        self.queued = Gauge("moa_requests_queued", "Requests waiting for a slot", registry=r)
        self.cache = Counter("moa_cache_lookups", "Response-cache lookups of deterministic requests", ["result"],
                             registry=r)
        self.aborted = Counter("moa_requests_aborted", "Requests aborted (client gone, timeout)", ["model", "reason"],
                               registry=r)

    def count_generation(self, model: str, generation: Generation) -> None:
        """A base-model request's engine call."""
        self.engine_calls.labels(model, "ok").inc()
        self._tokens(model, generation.prompt_tokens, generation.completion_tokens, generation.cached_prompt_tokens)
        if generation.ttft_s is not None:
            self.ttft.labels(model).observe(generation.ttft_s)

    def count_run(self, pipeline: str, result: RunResult) -> None:
        """A pipeline request: each engine call under its engine, the tokens under the pipeline."""
        for call in result.trace.calls:
            self.engine_calls.labels(call.model, call.status).inc()
        u = result.usage
        self._tokens(pipeline, u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)

    def _tokens(self, model: str, prompt: int, completion: int, cached: int) -> None:
        self.tokens.labels(model, "prompt").inc(prompt)
        self.tokens.labels(model, "completion").inc(completion)
        self.tokens.labels(model, "cached").inc(cached)
