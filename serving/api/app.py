"""The OpenAI-compatible HTTP server: base models and MoA pipelines behind /v1/chat/completions.

Every request holds an admission slot (bounded concurrency, bounded queue → 429),
runs under a timeout (→ 504), and is cancelled when its client goes away; cancelling
propagates to the engines, which abort the request, so no work leaks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import asdict, dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from moa.engine import Delta, Engine, EngineError, Generation, InvalidRequest, SamplingParams
from moa.runner import PipelineError, RunResult, iter_run, run
from moa.steps import Pipeline
from moa.trace import AnswerDelta, CallFinished, Event, StepFinished, StepStarted
from serving.api.errors import APIError, api_error_handler, body, error_response, validation_handler
from serving.api.metrics import Metrics
from serving.api.schemas import ChatCompletionRequest, CompletionRequest, MoAOptions
from serving.api.targets import apply_overrides, describe
from serving.registry import Registry

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 512


@dataclass
class ServerSettings:
    api_keys: list[str] = field(default_factory=list)
    max_concurrency: int = 16
    max_queue: int = 64
    request_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20


@dataclass
class ServerState:
    registry: Registry
    models: list[str]
    pipelines: dict[str, Pipeline]
    settings: ServerSettings
    engines: Mapping[str, Engine] = field(default_factory=dict)
    ready: bool = False
    checks: dict = field(default_factory=dict)  # model -> known-answer CheckResult, made at start
    metrics: Metrics = field(default_factory=Metrics)
    waiting: int = 0
    semaphore: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.settings.max_concurrency)

    def check_capacity(self) -> None:
        """A full queue is a 429 with Retry-After, decided before any response starts."""
        if self.semaphore.locked() and self.waiting >= self.settings.max_queue:
            raise APIError(429, f"server busy: {self.settings.max_concurrency} requests running and "
                                f"{self.waiting} queued; retry shortly", headers={"Retry-After": "1"})

    async def admit(self, *, check: bool = True) -> None:
        """Take a slot, waiting in the bounded queue."""
        if check:
            self.check_capacity()
        self.waiting += 1
        self.metrics.queued.set(self.waiting)
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queued.set(self.waiting)


def create_app(registry: Registry, *, models: list[str], pipelines: Mapping[str, Pipeline],
               settings: ServerSettings | None = None, engines: Mapping[str, Engine] | None = None) -> FastAPI:
    """Build the app. Without `engines`, the app starts (and later stops) the engines itself, one by one."""
    settings = settings or ServerSettings()
    # Every model a pipeline needs gets an engine, so it is served as a base model too.
    needed = list(dict.fromkeys([*models, *(m for p in pipelines.values() for m in p.models())]))
    state = ServerState(registry, needed, dict(pipelines), settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engines is not None:
            state.engines, state.ready = engines, True
            yield
            return
        from serving.engines.pool import EnginePool

        pool = EnginePool(registry, needed)
        state.engines = pool.engines
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

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if settings.api_keys:
                header = request.headers.get("authorization", "")
                if not header.startswith("Bearer ") or header[7:] not in settings.api_keys:
                    return error_response(401, "missing or invalid API key (Authorization: Bearer ...)",
                                          code="invalid_api_key")
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > settings.max_body_bytes:
                return error_response(413, f"request body of {length} bytes exceeds {settings.max_body_bytes}")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        # Each engine and where it runs: a Ray node, a local device set, or a remote server.
        engines = {}
        for name, engine in state.engines.items():
            where = getattr(engine, "node", None) or {}
            engines[name] = {"backend": registry.get(name).backend,
                             "placement": "ray" if where else "local",
                             **({"node_id": where.get("node_id"), "host": where.get("host")} if where else {}),
                             "running": engine.stats.running, "restarts": engine.stats.restarts}
        return {"status": "ok", "engines": engines}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if not state.ready:
            return error_response(503, "engines are starting", code="not_ready")
        checks = {name: {"ok": r.ok, "agreement": round(r.agreement, 3), "decisive_tokens": r.decisive,
                         "dtype": r.dtype, "replaced": r.replaced.dtype if r.replaced else None}
                  for name, r in state.checks.items()}
        return JSONResponse({"status": "ready", "models": state.models, "pipelines": list(state.pipelines),
                             "known_answer_checks": checks})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "moa-stack",
                 "moa": {"kind": "model", "backend": registry.get(name).backend}} for name in state.models]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "moa-stack", "moa": describe(p)}
                 for name, p in state.pipelines.items()]
        return {"object": "list", "data": data}

    def check_target(model: str) -> None:
        if not state.ready:
            raise APIError(503, "engines are starting; retry when GET /ready answers 200",
                           headers={"Retry-After": "5"})
        if model not in state.models and model not in state.pipelines:
            known = ", ".join([*state.models, *state.pipelines])
            raise APIError(404, f"model {model!r} is neither a served model nor a pipeline; served: {known}",
                           param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_target(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if req.model in state.pipelines:
            job = _pipeline_job(state, req, messages)
        else:
            job = _model_job(state, req, messages)
        return await respond(req, job, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_target(req.model)
        if req.model in state.pipelines:
            raise APIError(400, f"{req.model!r} is a pipeline: pipelines answer conversations, use "
                                "/v1/chat/completions", param="model")
        job = _model_job(state, req, req.prompt)
        job.kind = "text"
        return await respond(req, job, request)

    async def respond(req, job: _Job, request: Request):
        if req.stream:
            # The slot is taken inside the stream, so a response that never starts holds none.
            state.check_capacity()
            return StreamingResponse(_stream(state, req, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await state.admit()
        state.metrics.in_flight.inc()
        try:
            return await _complete(state, req, job, request)
        finally:
            state.metrics.in_flight.dec()
            state.semaphore.release()

    return app


async def _start(pool, state: ServerState) -> None:
    try:
        await pool.start()  # checks each engine's answers against its float32 reference as it starts
        state.checks = pool.checks
        state.ready = True
        log.info("ready: models %s, pipelines %s", state.models, list(state.pipelines))
    except Exception:
        log.exception("engines failed to start; /ready stays 503")


# -- jobs: what a request runs --------------------------------------------------------------


@dataclass
class _Job:
    kind: str  # model | pipeline
    engine: Engine | None = None
    params: SamplingParams | None = None
    pipeline: Pipeline | None = None
    messages: list = field(default_factory=list)
    options: MoAOptions = field(default_factory=MoAOptions)


def _model_job(state: ServerState, req: ChatCompletionRequest | CompletionRequest, messages: list | str) -> _Job:
    if getattr(req, "moa", None) is not None:
        raise APIError(400, "moa options apply to pipelines only", param="moa")
    if req.n > 1 and req.temperature == 0:
        raise APIError(400, "n > 1 needs temperature > 0 (greedy samples would be identical)", param="n")
    params = SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p,
                            max_tokens=req.token_limit() or DEFAULT_MAX_TOKENS, seed=req.seed,
                            stop=tuple(req.stop or ()))
    return _Job("model", engine=state.engines[req.model], params=params, messages=messages)


def _pipeline_job(state: ServerState, req: ChatCompletionRequest, messages: list) -> _Job:
    if req.n != 1:
        raise APIError(400, "n must be 1 for a pipeline (it writes one final answer)", param="n")
    if messages[-1]["role"] != "user":
        raise APIError(400, "the conversation must end with a user message", param="messages")
    options = req.moa or MoAOptions()
    pipeline = apply_overrides(state.pipelines[req.model], options, set(state.engines))
    if req.token_limit():
        pipeline = pipeline.with_max_tokens(req.token_limit())
    return _Job("pipeline", pipeline=pipeline, messages=messages, options=options)


# -- non-streaming ---------------------------------------------------------------------------


async def _complete(state: ServerState, req: ChatCompletionRequest, job: _Job, request: Request) -> JSONResponse:
    started = time.perf_counter()
    status = "200"
    task = asyncio.create_task(_run_job(state, job, req))
    # Watch the connection: a request whose client left is cancelled, which aborts its engine calls.
    gone = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=state.settings.request_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            reason = "client_gone" if gone in done else "timeout"
            state.metrics.aborted.labels(req.model, reason).inc()
            if reason == "client_gone":
                status = "499"
                return error_response(400, "client disconnected")
            raise APIError(504, f"no answer within {state.settings.request_timeout_s} s; the request was aborted")
        try:
            payload = task.result()
        except (InvalidRequest, ValueError) as exc:
            raise APIError(400, str(exc)) from exc
        except (PipelineError, EngineError) as exc:  # the engines failed, not the request
            raise APIError(503, str(exc), code="engine_failure") from exc
        state.metrics.latency.labels(req.model).observe(time.perf_counter() - started)
        return JSONResponse(payload)
    except APIError as exc:
        status = str(exc.status)
        raise
    finally:
        gone.cancel()
        state.metrics.requests.labels(req.model, status).inc()
        if not task.done():
            task.cancel()


async def _disconnected(request: Request) -> None:
    """Return when the ASGI server reports the client gone (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run_job(state: ServerState, job: _Job, req: ChatCompletionRequest) -> dict:
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if job.kind == "text":
        generation = await job.engine.generate(job.messages, job.params, request_id=rid)
        _count_model(state, req.model, generation)
        choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                   for c in generation.completions]
        return {"id": f"cmpl-{rid[9:]}", "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": _usage(generation.prompt_tokens, generation.completion_tokens,
                                                    generation.cached_prompt_tokens)}
    if job.kind == "model":
        generation = await job.engine.generate(job.messages, job.params, request_id=rid)
        _count_model(state, req.model, generation)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "logprobs": None} for c in generation.completions]
        usage = _usage(generation.prompt_tokens, generation.completion_tokens, generation.cached_prompt_tokens)
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage}
    result = await _run_pipeline(state, job, req)
    return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": _pipeline_usage(result), "moa": _summary(result, job.options.trace)}


async def _run_pipeline(state: ServerState, job: _Job, req: ChatCompletionRequest) -> RunResult:
    result = await run(job.pipeline, job.messages, state.engines, prices=state.registry.prices(), seed=req.seed)
    _count_pipeline(state, req.model, result)
    return result


def _usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _pipeline_usage(result: RunResult) -> dict:
    u = result.usage
    return _usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)


def _summary(result: RunResult, with_trace: bool) -> dict:
    u = result.usage
    layers = [{"layer": s.layer, "step": s.step, "seconds": round((s.end_s or 0) - s.start_s, 3),
               "responses": s.outputs, "notes": s.notes} for s in result.trace.steps]
    summary = {"pipeline": result.trace.pipeline, "engine_calls": u.calls, "cost_usd": u.cost_usd,
               "total_s": result.trace.total_s, "layers": layers, "data": result.data}
    if with_trace:
        summary["trace"] = result.trace.to_dict()
    return summary


def _count_model(state: ServerState, model: str, generation: Generation) -> None:
    m = state.metrics
    m.engine_calls.labels(model, "ok").inc()
    m.tokens.labels(model, "prompt").inc(generation.prompt_tokens)
    m.tokens.labels(model, "completion").inc(generation.completion_tokens)
    m.tokens.labels(model, "cached").inc(generation.cached_prompt_tokens)
    if generation.ttft_s is not None:
        m.ttft.labels(model).observe(generation.ttft_s)


def _count_pipeline(state: ServerState, model: str, result: RunResult) -> None:
    m = state.metrics
    for call in result.trace.calls:
        m.engine_calls.labels(call.model, call.status).inc()
    u = result.usage
    m.tokens.labels(model, "prompt").inc(u.prompt_tokens)
    m.tokens.labels(model, "completion").inc(u.completion_tokens)
    m.tokens.labels(model, "cached").inc(u.cached_prompt_tokens)


# -- streaming -------------------------------------------------------------------------------


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _stream(state: ServerState, req: ChatCompletionRequest, job: _Job) -> AsyncIterator[bytes]:
    """SSE chunks of the answer; cancelled (and so aborting engine work) when the client disconnects."""
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    started = time.perf_counter()
    first_token: float | None = None
    status = "200"

    def chunk(choices: list, **extra) -> bytes:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                     "choices": choices, **extra})

    def text_chunk(choices: list, **extra) -> bytes:
        return _sse({"id": f"cmpl-{rid[9:]}", "object": "text_completion", "created": created, "model": req.model,
                     "choices": choices, **extra})

    await state.admit(check=False)  # capacity was checked before the response started
    state.metrics.in_flight.inc()
    try:
        async with asyncio.timeout(state.settings.request_timeout_s):
            if job.kind == "text":
                async with aclosing(job.engine.stream(job.messages, job.params, request_id=rid)) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            if first_token is None and event.text:
                                first_token = time.perf_counter() - started
                            yield text_chunk([{"index": event.index, "text": event.text,
                                               "finish_reason": event.finish_reason, "logprobs": None}])
                        else:
                            _count_model(state, req.model, event)
                            if req.stream_options and req.stream_options.include_usage:
                                yield text_chunk([], usage=_usage(event.prompt_tokens, event.completion_tokens,
                                                                  event.cached_prompt_tokens))
            elif job.kind == "model":
                roles_sent: set[int] = set()
                async with aclosing(job.engine.stream(job.messages, job.params, request_id=rid)) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            delta: dict = {"content": event.text}
                            if event.index not in roles_sent:
                                roles_sent.add(event.index)
                                delta = {"role": "assistant", "content": event.text}
                            if first_token is None and event.text:
                                first_token = time.perf_counter() - started
                            yield chunk([{"index": event.index, "delta": delta, "finish_reason": event.finish_reason,
                                          "logprobs": None}])
                        else:
                            _count_model(state, req.model, event)
                            if req.stream_options and req.stream_options.include_usage:
                                yield chunk([], usage=_usage(event.prompt_tokens, event.completion_tokens,
                                                             event.cached_prompt_tokens))
            else:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None}])
                result: RunResult | None = None
                streamed = False
                run_items = iter_run(job.pipeline, job.messages, state.engines, prices=state.registry.prices(),
                                     seed=req.seed)
                async with aclosing(run_items) as items:
                    async for item in items:
                        if isinstance(item, AnswerDelta):
                            streamed = True
                            if first_token is None:
                                first_token = time.perf_counter() - started
                            yield chunk([{"index": 0, "delta": {"content": item.text}, "finish_reason": None,
                                          "logprobs": None}])
                        elif isinstance(item, RunResult):
                            result = item
                        elif job.options.events:
                            yield chunk([], moa={"event": _event_name(item), **_event_fields(item)})
                assert result is not None
                _count_pipeline(state, req.model, result)
                if not streamed:  # the last step was a transform (vote, rank): the answer arrives whole
                    first_token = time.perf_counter() - started
                    yield chunk([{"index": 0, "delta": {"content": result.answer}, "finish_reason": None,
                                  "logprobs": None}])
                yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}])
                extra = {"moa": _summary(result, job.options.trace)}
                if req.stream_options and req.stream_options.include_usage:
                    extra["usage"] = _pipeline_usage(result)
                yield chunk([], **extra)
        yield _sse("[DONE]")
    except TimeoutError:
        status = "504"
        state.metrics.aborted.labels(req.model, "timeout").inc()
        yield _sse(body(504, f"no answer within {state.settings.request_timeout_s} s; the request was aborted"))
        yield _sse("[DONE]")
    except (InvalidRequest, ValueError) as exc:
        status = "400"
        yield _sse(body(400, str(exc)))
        yield _sse("[DONE]")
    except (PipelineError, EngineError) as exc:
        status = "503"
        yield _sse(body(503, str(exc), code="engine_failure"))
        yield _sse("[DONE]")
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"  # client went away: leaving this generator cancelled the engine requests
        state.metrics.aborted.labels(req.model, "client_gone").inc()
        raise
    finally:
        state.metrics.requests.labels(req.model, status).inc()
        state.metrics.latency.labels(req.model).observe(time.perf_counter() - started)
        if first_token is not None:
            state.metrics.ttft.labels(req.model).observe(first_token)
        state.metrics.in_flight.dec()
        state.semaphore.release()


def _event_name(event: Event) -> str:
    return {StepStarted: "layer_started", StepFinished: "layer_finished",
            CallFinished: "call_finished"}.get(type(event), type(event).__name__)


def _event_fields(event: Event) -> dict:
    return asdict(event)
