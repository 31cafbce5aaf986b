"""What a request's `model` names: a base model (straight to its engine) or a pipeline, with overrides."""

from __future__ import annotations

from dataclasses import fields, replace

from moa.pipeline import Pipeline
from moa.steps import Aggregate, AggregateSeq, LLMStep, Propose, Step, Synthesis, Synthesize
from serving.api.errors import APIError
from serving.api.schemas import MoAOptions


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
