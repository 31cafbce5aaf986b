"""What the server holds between requests: settings, engines, readiness, metrics, and concurrency slots."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from moa.context import CodeRunner
from moa.engine import Engine
from moa.pipeline import Pipeline
from serving.api.errors import APIError
from serving.api.metrics import Metrics
from serving.models.registry import Registry

if TYPE_CHECKING:
    from serving.api.cache import ResponseCache
    from serving.api.votes import Completions
    from serving.engines.pool import EnginePool

# How long a client is told to wait while an engine starts (an engine start takes tens of seconds to minutes;
# polling faster only adds requests).
RETRY_AFTER_S = 10


@dataclass
class ServerSettings:
    api_keys: list[str] = field(default_factory=list)
    max_concurrency: int = 16
    max_queue: int = 64
    request_timeout_s: float = 600.0
    keepalive_s: float = 15.0  # a stream with nothing to send for this long sends an SSE comment line
    max_body_bytes: int = 1 << 20  # counted while the body arrives (serving/api/access.py)
    metrics_public: bool = False  # with API keys set, /metrics needs one too unless this is True
    rate_limit_per_minute: float | None = None  # per API key (per client address without keys); None: off
    rate_limit_burst: int = 10
    cache_entries: int = 0  # answers to deterministic requests kept in memory (serving/api/cache.py); 0: off
    cache_path: Path | None = None  # and in this directory (diskcache), across restarts and servers
    votes_path: Path | None = None  # the playground's compare-view votes (JSONL); None: voting is off
    code_execution: bool = False  # pipelines with a `check` step may run (model-written code, in the sandbox)

    def __post_init__(self) -> None:
        if self.keepalive_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("keepalive_s and request_timeout_s must be positive")


@dataclass
class ServerState:
    registry: Registry
    models: list[str]
    pipelines: dict[str, Pipeline]
    settings: ServerSettings
    engines: Mapping[str, Engine] = field(default_factory=dict)
    ready: bool = False  # every engine is up (GET /ready); models answer one by one before that
    up: list[str] = field(default_factory=list)  # models answering now, in start order (the pool's own list)
    pool: EnginePool | None = None  # the engines this server starts itself (None: handed in, all up)
    start_error: str | None = None  # why the engines stopped starting; nothing is served then
    checks: dict = field(default_factory=dict)  # model -> known-answer CheckResult, made at start
    metrics: Metrics = field(default_factory=Metrics)
    waiting: int = 0
    semaphore: asyncio.Semaphore = field(init=False)
    cache: ResponseCache | None = field(init=False)
    completions: Completions | None = field(init=False)  # what a playground vote may name (votes on)
    code_runner: CodeRunner | None = field(init=False)

    def __post_init__(self) -> None:
        from serving.api.cache import ResponseCache
        from serving.api.votes import Completions
        from serving.sandbox import check_sandbox

        self.code_runner = check_sandbox() if self.settings.code_execution else None

        self.semaphore = asyncio.Semaphore(self.settings.max_concurrency)
        self.cache = (ResponseCache(self.settings.cache_entries, self.settings.cache_path)
                      if self.settings.cache_entries else None)
        self.completions = Completions() if self.settings.votes_path else None

    def check_target(self, model: str) -> None:
        """The request's `model` is served (else 404); a base model can answer now (else `blocker`'s 503). A
        pipeline's models are checked on its job (`check_answers`): a request's `moa` overrides may change them."""
        if model not in self.models and model not in self.pipelines:
            known = ", ".join([*self.models, *self.pipelines])
            raise APIError(404, f"model {model!r} is neither a served model nor a pipeline; served: {known}",
                           param="model", code="model_not_found")
        if model not in self.pipelines:
            self.check_answers([model], model)

    def check_answers(self, models: Iterable[str], target: str) -> None:
        """A request that needs a model that cannot answer now is a 503 naming it, before any engine call."""
        if (refusal := self.blocker(models, target)) is not None:
            raise refusal

    def target_models(self, target: str) -> tuple[str, ...]:
        return self.pipelines[target].models() if target in self.pipelines else (target,)

    def waiting_for(self, models: Iterable[str]) -> list[str]:
        """Which of `models` have no engine answering yet (starting, or waiting for their turn to start)."""
        return [m for m in dict.fromkeys(models) if m not in self.up]

    def engine_states(self) -> dict[str, str]:
        """Per served model: up, starting, queued, or failed (the start stopped before it was up)."""
        starting = self.pool.starting if self.pool is not None else None
        return {m: "up" if m in self.up else "failed" if self.start_error
                else "starting" if self._engine_of(m) == starting else "queued" for m in self.models}

    def _engine_of(self, model: str) -> str:
        """The model whose engine serves `model` (an adapter: its base)."""
        return (self.registry.adapter_of(model) or (model,))[0]

    def blocker(self, models: Iterable[str], target: str) -> APIError | None:
        """Why `target` cannot answer now with `models` — the engines failed to start, one is still starting
        (Retry-After), or one failed its known-answer check — or None. The one rule behind requests,
        GET /ready?target= and /v1/models' `ready`."""
        if self.start_error is not None:
            return APIError(503, f"the engines failed to start, so nothing is served: {self.start_error}; see "
                                 "the server log", code="engines_failed")
        models = list(dict.fromkeys(models))
        if waiting := self.waiting_for(models):
            states = self.engine_states()
            order = {m: i for i, m in enumerate(self.models, 1)}
            what = "; ".join(f"{m} ({states.get(m, 'not served')}, engine {order.get(m, '?')} of "
                             f"{len(self.models)})" for m in waiting)
            kind = "pipeline" if target in self.pipelines else "model"
            return APIError(503, f"{kind} {target!r} waits for its engine{'s' if len(waiting) > 1 else ''} to "
                                 f"start: {what}; up now: {', '.join(self.up) or 'none yet'}. Retry after "
                                 f"{RETRY_AFTER_S} s, or poll GET /ready?target={target}",
                            code="model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        refused = self.refused_models()
        if reasons := list(dict.fromkeys(refused[e] for m in models if (e := self._engine_of(m)) in refused)):
            return APIError(503, "; ".join(reasons), code="known_answer_failed")
        return None

    def refused_models(self) -> dict[str, str]:
        """Models whose known-answer check failed at start and whose entry does not accept that: why, per model.

        An engine that disagrees with its float32 reference is running, but its answers are not the model's;
        serving them as if they were is what the check exists to stop (`known_answer: warn` accepts it).
        """
        return {name: (f"model {name!r} failed its known-answer check at start ({r.dtype}: "
                       f"{100 * r.agreement:.0f}% teacher-forced, {100 * r.decode_agreement:.0f}% decoded of its "
                       f"decisive tokens, {r.decisive}/{r.decode_decisive}; 90% needed), so its answers are not "
                       "the model's; see GET /ready and the server log. To serve it anyway, knowingly, set "
                       f"`known_answer: warn` on {name!r} in models.yaml")
                for name, r in self.checks.items()
                if not r.ok and name in self.registry.models and self.registry.get(name).known_answer == "require"}

    def check_capacity(self) -> None:
        """A full queue is a 429 with Retry-After, decided before any response starts."""
        if self.semaphore.locked() and self.waiting >= self.settings.max_queue:
            raise APIError(429, f"server busy: {self.settings.max_concurrency} requests running and "
                                f"{self.waiting} queued; retry shortly", headers={"Retry-After": "1"})

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of `max_concurrency` slots for the body of the `async with`, waiting in the queue first."""
        self.waiting += 1
        self.metrics.queued.set(self.waiting)
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queued.set(self.waiting)
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.metrics.in_flight.dec()
            self.semaphore.release()
