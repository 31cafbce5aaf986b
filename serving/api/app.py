"""The OpenAI-compatible HTTP server: base models and MoA pipelines behind /v1/chat/completions.

How a request flows (docs/ARCHITECTURE.md): route → job (serving/api/targets.py, serving/api/jobs.py) →
delivery under a slot, a timeout and the client's presence (serving/api/delivery.py)
→ engine or pipeline run (moa/runner.py). The routes here only check and dispatch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from moa.engine import Engine
from moa.pipeline import Pipeline, engines_needed
from serving.api.access import BodyLimit, RateLimiter, accepted, key_of, rate_key
from serving.api.delivery import respond
from serving.api.errors import (
    APIError,
    api_error_handler,
    body,
    documented_errors,
    error_response,
    http_error_handler,
    validation_handler,
    without_422,
)
from serving.api.playground import playground_routes
from serving.api.schemas import ChatCompletionRequest, CompletionRequest
from serving.api.state import RETRY_AFTER_S, ServerSettings, ServerState
from serving.api.targets import chat_job, describe, text_job
from serving.models.registry import Registry

__all__ = ["ServerSettings", "create_app"]
log = logging.getLogger(__name__)


def create_app(registry: Registry, *, models: list[str], pipelines: Mapping[str, Pipeline],
               settings: ServerSettings | None = None, engines: Mapping[str, Engine] | None = None,
               on_progress: Callable[[str], None] | None = None) -> FastAPI:
    """Build the app. Without `engines`, the app starts (and later stops) the engines itself, one by one, in
    the order of `engines_needed` (the named models first), and answers each model as soon as its engine
    is up, each pipeline as soon as all of its models are. `on_progress` hears a line per engine start."""
    settings = settings or ServerSettings()
    needed = registry.with_adapters(engines_needed(models, pipelines))  # an engine serves all of its adapters
    state = ServerState(registry, needed, dict(pipelines), settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engines is not None:
            state.engines, state.ready, state.up = engines, True, list(engines)
            yield
            return
        from serving.engines.pool import EnginePool

        pool = EnginePool(registry, needed, on_progress=on_progress)
        # The server reads the pool's own dict and list: a model answers from the moment the pool lists it up.
        state.pool, state.engines, state.up, state.checks = pool, pool.engines, pool.up, pool.checks
        start = asyncio.create_task(_start(pool, state))
        try:
            yield
        finally:
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            state.ready = False
            await pool.close()

    app = FastAPI(title="moa-stack", version="0.1.0", lifespan=lifespan)
    app.state.moa = state
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # inside `guard`: keys are checked first
    limiter = (RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
               if settings.rate_limit_per_minute else None)
    app.state.limiter = limiter  # what it holds can be read (tests: its table stays bounded)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        key = key_of(request.headers.get("authorization", ""))
        protected = path.startswith("/v1/") or (path == "/metrics" and not settings.metrics_public)
        if settings.api_keys and protected and not accepted(key, settings.api_keys):
            return error_response(401, "missing or invalid API key (Authorization: Bearer ...)",
                                  code="invalid_api_key")
        if limiter is not None and path.startswith("/v1/") and request.method == "POST":
            wait = limiter.take(rate_key(key, settings.api_keys, request.client.host if request.client else None))
            if wait is not None:
                return limiter.refusal(wait)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        # Engines only: an adapter (BASE:ADAPTER) is listed under the engine that serves it.
        return {"status": "ok", "engines": {name: _engine_health(registry, name, engine)
                                            for name, engine in state.engines.items()
                                            if registry.adapter_of(name) is None}}

    @app.get("/ready", responses=documented_errors(404, 503))
    async def ready(target: str | None = None) -> JSONResponse:
        """200 when every engine is up and answers right; with `target`, when that model or pipeline can
        answer (its engines up, their known-answer checks passed)."""
        if target is not None:
            state.check_target(target)  # 404 for a name not served
            models = state.target_models(target)
            state.check_answers(models, target)  # 503 naming what it waits for, or why it is refused
            if unwell := {m: s for m in models if (s := getattr(state.engines[m], "state", "ready")) != "ready"}:
                raise APIError(503, f"engines not ready: {unwell}", code="not_ready",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            return JSONResponse({"status": "ready", "target": target, "models": list(models)})
        if not state.ready:
            started = state.engine_states()
            engines = {m: s for m, s in started.items() if registry.adapter_of(m) is None}
            message = (f"the engines failed to start: {state.start_error}" if state.start_error else
                       f"engines are starting ({sum(s == 'up' for s in engines.values())} of {len(engines)} up); "
                       "models that are up answer already (GET /ready?target=NAME)")
            failed = body(503, message, code="engines_failed" if state.start_error else "not_ready")
            return JSONResponse({**failed, "engines": started}, status_code=503,
                                headers={} if state.start_error else {"Retry-After": str(RETRY_AFTER_S)})
        unwell = {name: s for name, e in state.engines.items() if (s := getattr(e, "state", "ready")) != "ready"}
        if unwell:  # a dead engine restarts on its next request; until then this replica is not ready
            return error_response(503, f"engines not ready: {unwell}", code="not_ready",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
        checks = {name: {"ok": r.ok, "agreement": round(r.agreement, 3), "decisive_tokens": r.decisive,
                         "decode_agreement": round(r.decode_agreement, 3), "decode_decisive_tokens": r.decode_decisive,
                         "dtype": r.dtype, "configured_dtype": registry.get(name).engine.dtype,
                         "replaced": r.replaced.dtype if r.replaced else None, "seconds": round(r.seconds, 2)}
                  for name, r in state.checks.items()}
        if refused := state.refused_models():  # a replica serving wrong answers is not ready
            failed = body(503, "; ".join(refused.values()), code="known_answer_failed")
            return JSONResponse({**failed, "known_answer_checks": checks}, status_code=503)
        return JSONResponse({"status": "ready", "models": state.models, "pipelines": list(state.pipelines),
                             "known_answer_checks": checks})

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus metrics", "content": {CONTENT_TYPE_LATEST.split(";")[0]: {
            "schema": {"type": "string"}}}}, **documented_errors(401)})
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=documented_errors(401))
    async def list_models() -> dict:
        created = int(time.time())
        # `ready`: the target answers now; `waiting_for`: the models whose engines it still waits for.
        data = [_model_entry(registry, state, name, created) for name in state.models]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "moa-stack",
                  "moa": {**describe(p), **_readiness(state, name, p.models())}} for name, p in state.pipelines.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", responses=POST_ERRORS)
    async def chat(req: ChatCompletionRequest, request: Request):
        state.check_target(req.model)
        job = chat_job(state, req)
        state.check_answers(job.models(), req.model)
        return await respond(state, job, request, stream=req.stream)

    @app.post("/v1/completions", responses=POST_ERRORS)
    async def completions(req: CompletionRequest, request: Request):
        state.check_target(req.model)
        job = text_job(state, req)
        state.check_answers(job.models(), req.model)
        return await respond(state, job, request, stream=req.stream)

    app.include_router(playground_routes(state))
    openapi = app.openapi

    def document() -> dict:
        """FastAPI's document, with 400 for 422 and the `model` values this server serves."""
        schema = without_422(openapi())
        bodies = schema.get("components", {}).get("schemas", {})
        for name, served in (("ChatCompletionRequest", [*state.models, *state.pipelines]),
                             ("CompletionRequest", list(state.models))):
            if name in bodies and served:
                bodies[name]["properties"]["model"]["enum"] = served
        return schema

    app.openapi = document  # type: ignore[method-assign]
    return app


# 200: a JSON body, or with `stream: true` server-sent events (docs/API.md); then every error status.
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                             "id": {"type": "string"}, "retry": {"type": "integer"}}}
POST_ERRORS = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}},
               **documented_errors(400, 401, 404, 413, 429, 500, 503, 504)}


def _model_entry(registry: Registry, state: ServerState, name: str, created: int) -> dict:
    """A base model, or an adapter (with `parent`, as vLLM's own server lists LoRA modules)."""
    entry = {"id": name, "object": "model", "created": created, "owned_by": "moa-stack"}
    moa = {"kind": "model", "backend": registry.get(name).backend, **_readiness(state, name, [name])}
    if (adapter := registry.adapter_of(name)) is not None:
        entry["parent"] = adapter[0]
        moa = {**moa, "kind": "adapter", "base": adapter[0], "adapter": adapter[1]}
    return {**entry, "moa": moa}


def _readiness(state: ServerState, target: str, models) -> dict:
    """`ready`: the target answers now (the same rule as a request's); `blocked`: else the 503's code;
    `waiting_for`: the models whose engines it still waits for."""
    refusal = state.blocker(models, target)
    return {"ready": refusal is None, "blocked": refusal.code if refusal else None,
            "waiting_for": state.waiting_for(models)}


def _engine_health(registry: Registry, name: str, engine: Engine) -> dict:
    """An engine and where it runs: a Ray node, or this machine (local devices, or a remote server's client)."""
    where = getattr(engine, "node", None) or {}
    inside = getattr(engine, "running_requests", None)  # vLLM's own count of unfinished requests (in-process)
    adapters = list(getattr(engine, "adapters", None) or {})
    return {"backend": registry.get(name).backend, "placement": "ray" if where else "local",
            **({"adapters": [f"{name}:{a}" for a in adapters]} if adapters else {}),
            **({"node_id": where.get("node_id"), "host": where.get("host")} if where else {}),
            "state": getattr(engine, "state", "ready"), "running": engine.stats.running,
            "restarts": engine.stats.restarts,
            **({"unfinished_in_engine": inside} if isinstance(inside, int) else {})}


async def _start(pool, state: ServerState) -> None:
    try:
        await pool.start()  # checks each engine's answers against its float32 reference as it starts
        state.ready = True
        pool.on_progress(f"all {len(pool.specs)} engines up: every model and pipeline answers, GET /ready is 200")
        log.info("ready: models %s, pipelines %s", state.models, list(state.pipelines))
    except Exception as exc:
        # The pool closed every engine it had started: nothing is served, and requests say why.
        state.start_error = f"{type(exc).__name__}: {exc}"
        log.exception("engines failed to start; nothing is served and /ready stays 503")
