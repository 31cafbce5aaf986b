"""What a request's `model` names: a base model (straight to its engine) or a pipeline, with overrides;
the job that runs it (`chat_job`, `text_job`: the request checked and turned into serving/api/jobs.py's jobs)."""

from __future__ import annotations

from dataclasses import fields, replace

from moa.engine import Engine, InvalidRequest, SamplingParams
from moa.pipeline import Pipeline
from moa.steps import Aggregate, AggregateSeq, LLMStep, Propose, Step, Synthesis, Synthesize
from serving.api.errors import APIError
from serving.api.jobs import ChatJob, Job, PipelineJob, TextJob
from serving.api.schemas import ChatCompletionRequest, CompletionRequest, MoAOptions
from serving.api.state import ServerState

DEFAULT_MAX_TOKENS = 512


def apply_overrides(pipeline: Pipeline, options: MoAOptions, served: set[str]) -> Pipeline:
    """The pipeline with a request's proposers / aggregator / layers / strategy / quorum applied."""
    try:
        return _apply(pipeline, options, served)
    except ValueError as exc:  # a step refused the combination (e.g. min_success above the new proposers)
        raise APIError(400, f"moa: {exc}", param="moa") from None


def _apply(pipeline: Pipeline, options: MoAOptions, served: set[str]) -> Pipeline:
    for name in [*(options.proposers or []), *([options.aggregator] if options.aggregator else [])]:
        if name not in served:
            raise APIError(400, f"moa: model {name!r} is not served here; served: {', '.join(sorted(served))}",
                           param="moa", code="model_not_served")
    steps = list(pipeline.steps)
    propose_at = next((i for i, s in enumerate(steps) if isinstance(s, Propose)), None)
    needs_propose = [k for k in ("proposers", "quorum", "layers") if getattr(options, k) is not None]
    if propose_at is None and needs_propose:
        raise APIError(400, f"moa.{needs_propose[0]} applies to pipelines with a propose step; "
                            f"{pipeline.name!r} starts with {steps[0].kind}", param=f"moa.{needs_propose[0]}")
    if options.proposers:
        steps[propose_at] = replace(steps[propose_at], models=tuple(options.proposers))
    if options.quorum is not None:
        total = len(steps[propose_at].models) * steps[propose_at].samples
        if options.quorum > total:
            raise APIError(400, f"moa.quorum {options.quorum} exceeds the {total} proposals", param="moa.quorum")
        steps[propose_at] = replace(steps[propose_at], quorum=options.quorum)
    if options.aggregator:
        last = [i for i, s in enumerate(steps) if isinstance(s, (Aggregate, AggregateSeq))]
        if last:
            steps[last[-1]] = replace(steps[last[-1]], model=options.aggregator)
        else:
            steps.append(Aggregate(model=options.aggregator))
    if options.layers is not None:
        if any(s.inputs for s in steps):  # adding or dropping layers would renumber the steps they read
            raise APIError(400, f"moa.layers cannot change pipeline {pipeline.name!r}: its steps read earlier "
                                "steps by number (inputs)", param="moa.layers")
        steps = _with_layers(steps, options.layers, propose_at)
    if options.strategy:
        steps = [replace(s, strategy=options.strategy) if isinstance(s, Synthesis) else s for s in steps]
    return replace(pipeline, steps=tuple(steps))


def _with_layers(steps: list, layers: int, propose_at: int) -> list:
    """LLM layers = propose + synthesize layers + aggregate; add or drop synthesize layers to match."""
    has_aggregate = any(isinstance(s, (Aggregate, AggregateSeq)) for s in steps)
    fixed = 1 + int(has_aggregate)
    want = layers - fixed
    if want < 0:
        raise APIError(400, f"moa.layers must be at least {fixed} for this pipeline", param="moa.layers")
    synth = [i for i, s in enumerate(steps) if isinstance(s, Synthesize)]
    if len(synth) > want:
        drop = set(synth[want:])
        return [s for i, s in enumerate(steps) if i not in drop]
    template = steps[synth[-1]] if synth else Synthesize(models=steps[propose_at].models,
                                                         max_tokens=steps[propose_at].max_tokens)
    at = (synth[-1] + 1) if synth else propose_at + 1
    return steps[:at] + [template] * (want - len(synth)) + steps[at:]


def describe(pipeline: Pipeline) -> dict:
    """A pipeline for /v1/models: its steps and models."""
    return {"kind": "pipeline", "description": pipeline.description, "models": list(pipeline.models()),
            "steps": [describe_step(s) for s in pipeline.steps]}


def describe_step(step: Step) -> dict:
    """The kind, the models, and the settings a reader needs to tell steps apart (any step class, unchanged)."""
    entry: dict = {"step": step.kind}
    if isinstance(step, LLMStep):
        entry["models"] = list(step.models_used())
    for f in fields(step):
        value = getattr(step, f.name)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if f.name in _NOT_DESCRIBED or (value == default and f.name not in _ALWAYS_DESCRIBED):
            continue
        entry[f.name] = list(value) if isinstance(value, tuple) else value
    return entry


_NOT_DESCRIBED = {"model", "models", "prompt", "role_prompts", "temperature_offsets", "budget", "timeout_s"}
_ALWAYS_DESCRIBED = {"samples", "strategy", "k", "window", "rate", "normalize"}


def chat_job(state: ServerState, req: ChatCompletionRequest) -> Job:
    _refuse_tools(req)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    schema = req.response_format.schema_or_none() if req.response_format else None
    if req.model not in state.pipelines:
        params = _sampling(req, schema)
        _validate(state.engines[req.model], messages, params)
        return ChatJob(state, req.model, state.engines[req.model], messages, params,
                       _include_usage(req), use_cache=req.moa.cache if req.moa else True)
    if schema is not None:
        raise APIError(400, "response_format applies to base models; a pipeline writes free text (the council "
                            "preset answers with a structured verdict)", param="response_format")
    if req.n != 1:
        raise APIError(400, "n must be 1 for a pipeline (it writes one final answer)", param="n")
    if messages[-1]["role"] != "user":
        raise APIError(400, "the conversation must end with a user message", param="messages")
    if state.pipelines[req.model].runs_code() and state.code_runner is None:
        raise APIError(400, f"pipeline {req.model!r} runs model-written code (a check step) and code execution is "
                            "off on this server: start it with --allow-code-execution (or server.code_execution: "
                            "true in models.yaml)", param="model", code="code_execution_disabled")
    options = req.moa or MoAOptions()
    pipeline = apply_overrides(state.pipelines[req.model], options, set(state.models))
    if req.token_limit():
        pipeline = pipeline.with_max_tokens(req.token_limit())
    sampling = {k: getattr(req, k) for k in ("temperature", "top_p", "stop") if k in req.model_fields_set
                and getattr(req, k) is not None}
    try:  # the request's sampling shapes the answer: it applies to the step that writes it
        pipeline = pipeline.with_answer_sampling(**{k: tuple(v) if k == "stop" else v for k, v in sampling.items()})
    except ValueError as exc:
        raise APIError(400, str(exc), param=next(iter(sampling))) from None
    return PipelineJob(state, req.model, pipeline, messages, options, req.seed, _include_usage(req))


def _refuse_tools(req: ChatCompletionRequest | CompletionRequest) -> None:
    """No function calling here: a request that relies on it gets a 400, not an answer that ignored its tools."""
    if req.tools or req.functions or req.tool_choice not in (None, "none"):
        raise APIError(400, "tools / functions / tool_choice are not supported: moa-stack serves no function "
                            "calling; send the request without them", param="tools")


def text_job(state: ServerState, req: CompletionRequest) -> TextJob:
    _refuse_tools(req)
    if req.model in state.pipelines:
        raise APIError(400, f"{req.model!r} is a pipeline: pipelines answer conversations, use "
                            "/v1/chat/completions", param="model")
    params = _sampling(req)
    _validate(state.engines[req.model], req.prompt, params)
    return TextJob(state, req.model, state.engines[req.model], req.prompt, params, _include_usage(req))


def _validate(engine: Engine, prompt: list | str, params: SamplingParams) -> None:
    """What the engine would refuse (prompt + max_tokens beyond its context) is a 400 before any byte of a stream."""
    check = getattr(engine, "validate_request", None)
    if check is not None:
        try:
            check(prompt, params)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=getattr(exc, "param", "max_tokens")) from None


def _sampling(req: ChatCompletionRequest | CompletionRequest, json_schema: dict | None = None) -> SamplingParams:
    if getattr(req, "moa", None) is not None and req.moa.model_fields_set - {"cache"}:
        raise APIError(400, "moa options apply to pipelines only (a base model takes moa.cache alone)", param="moa")
    if req.n > 1 and req.temperature == 0:
        raise APIError(400, "n > 1 needs temperature > 0 (greedy samples would be identical)", param="n")
    return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p,
                          max_tokens=req.token_limit() or DEFAULT_MAX_TOKENS, seed=req.seed, stop=tuple(req.stop or ()),
                          json_schema=json_schema)


def _include_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)
