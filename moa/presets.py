"""Pipelines as data: the `pipelines:` section of models.yaml → Pipeline values, validated.

    moa-lite:
      description: two layers
      steps:
        - propose: {models: [a, b, c], temperature: 0.7}
        - aggregate: {model: c, strategy: moa}

Errors name the pipeline, the step and the field, so a typo in a preset is caught
when the file loads, not halfway through a request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from moa.steps import (
    Aggregate,
    AggregateSeq,
    Dropout,
    Filter,
    MajorityVote,
    Map,
    Pipeline,
    Propose,
    Rank,
    ReferenceBudget,
    Refine,
    Sample,
    Shuffle,
    Step,
    Synthesize,
    Take,
    Vote,
)

STEP_KINDS: dict[str, type] = {
    "propose": Propose,
    "synthesize": Synthesize,
    "aggregate": Aggregate,
    "aggregate-seq": AggregateSeq,
    "refine": Refine,
    "rank": Rank,
    "vote": Vote,
    "shuffle": Shuffle,
    "dropout": Dropout,
    "sample": Sample,
    "take": Take,
    "filter": Filter,
    "map": Map,
    "majority-vote": MajorityVote,
}


class PresetError(ValueError):
    """A pipeline definition is invalid; the message names pipeline, step and field."""


def parse_step(where: str, entry: Any) -> Step:
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise PresetError(f"{where}: a step is a mapping with one key, the step kind ({', '.join(STEP_KINDS)})")
    (kind, args), = entry.items()
    cls = STEP_KINDS.get(kind)
    if cls is None:
        raise PresetError(f"{where}: unknown step kind {kind!r}; known: {', '.join(STEP_KINDS)}")
    args = dict(args or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise PresetError(f"{where} ({kind}): unknown field(s) {unknown}; known: {sorted(known)}")
    if isinstance(args.get("budget"), Mapping):
        args["budget"] = ReferenceBudget(**args["budget"])
    try:
        step = TypeAdapter(cls).validate_python(args)
    except ValidationError as exc:
        problems = "; ".join(f"field {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PresetError(f"{where} ({kind}): {problems}") from None
    return step


def check_step(where: str, step: Step, models: Collection[str] | None) -> None:
    names: tuple[str, ...] = ()
    if isinstance(step, (Propose, Synthesize, Refine)):
        if not step.models:
            raise PresetError(f"{where}: `models` must name at least one model")
        names = step.models
    elif isinstance(step, (Aggregate, AggregateSeq, Rank, Vote)):
        if not step.model:
            raise PresetError(f"{where}: `model` is required")
        names = (step.model,)
    if models is not None:
        missing = [m for m in names if m not in models]
        if missing:
            raise PresetError(f"{where}: unknown model(s) {missing}; known: {', '.join(sorted(models))}")
    if isinstance(step, Propose):
        total = len(step.models) * step.samples
        if step.quorum is not None and not 1 <= step.quorum <= total:
            raise PresetError(f"{where}: quorum {step.quorum} must be between 1 and the {total} samples")
        if step.min_success > total:
            raise PresetError(f"{where}: min_success {step.min_success} exceeds the {total} samples")
        if total > len(set(step.models)) and step.temperature == 0:
            raise PresetError(f"{where}: sampling one model several times needs temperature > 0")
    if isinstance(step, AggregateSeq) and step.window < 1:
        raise PresetError(f"{where}: window must be >= 1")


def parse_pipeline(name: str, data: Any, models: Collection[str] | None = None) -> Pipeline:
    if not isinstance(data, Mapping):
        raise PresetError(f"pipeline {name!r}: expected a mapping with `steps`")
    unknown = sorted(set(data) - {"steps", "description"})
    if unknown:
        raise PresetError(f"pipeline {name!r}: unknown field(s) {unknown}; known: ['description', 'steps']")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise PresetError(f"pipeline {name!r}: `steps` must be a non-empty list")
    steps = []
    for i, entry in enumerate(raw_steps, 1):
        where = f"pipeline {name!r}, step {i}"
        step = parse_step(where, entry)
        check_step(where, step, models)
        steps.append(step)
    if not isinstance(steps[0], Propose):
        raise PresetError(f"pipeline {name!r}: the first step must be `propose` (it makes the first responses)")
    return Pipeline(name, tuple(steps), str(data.get("description", "")))


def parse_pipelines(data: Mapping[str, Any], models: Collection[str] | None = None) -> dict[str, Pipeline]:
    overlap = sorted(set(data) & set(models or ()))
    if overlap:
        raise PresetError(f"pipeline name(s) {overlap} are also model names; a request could not tell them apart")
    return {name: parse_pipeline(name, body, models) for name, body in data.items()}
