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

import moa.transform_steps  # noqa: F401 - registers the transform step kinds
from moa.pipeline import Pipeline
from moa.steps import STEP_TYPES, LLMStep, Step


class PresetError(ValueError):
    """A pipeline definition is invalid; the message names pipeline, step and field."""


def parse_step(where: str, entry: Any) -> Step:
    """One `- kind: {fields}` entry → its registered step class, values checked by the class itself."""
    kinds = ", ".join(STEP_TYPES)
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise PresetError(f"{where}: a step is a mapping with one key, the step kind ({kinds})")
    (kind, args), = entry.items()
    cls = STEP_TYPES.get(kind)
    if cls is None:
        raise PresetError(f"{where}: unknown step kind {kind!r}; known: {kinds}")
    if args is not None and not isinstance(args, Mapping):
        raise PresetError(f"{where} ({kind}): expected a mapping of fields, got {type(args).__name__}")
    args = dict(args or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise PresetError(f"{where} ({kind}): unknown field(s) {unknown}; known: {sorted(known)}")
    try:
        return TypeAdapter(cls).validate_python(args)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise PresetError(f"{where} ({kind}): {problems}") from None


def _problem(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    loc = ".".join(map(str, error["loc"]))
    return f"field {loc}: {message}" if loc else message


def check_models(where: str, step: Step, models: Collection[str] | None,
                 routers: Collection[str] | None = None) -> None:
    """The models (and router) a step names exist in the registry."""
    if not isinstance(step, LLMStep):
        return
    missing = [m for m in step.models_used() if models is not None and m not in models]
    if missing:
        raise PresetError(f"{where}: unknown model(s) {missing}; known: {', '.join(sorted(models or ()))}")
    router = getattr(step, "router", None)
    if router is not None and routers is not None and router not in routers:
        known = ", ".join(sorted(routers)) or "none (add a `routers:` section; `moa route fit` writes one)"
        raise PresetError(f"{where}: unknown router {router!r}; known: {known}")


def parse_pipeline(name: str, data: Any, models: Collection[str] | None = None,
                   routers: Collection[str] | None = None) -> Pipeline:
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
        check_models(where, step, models, routers)
        steps.append(step)
    if not steps[0].from_conversation:
        firsts = ", ".join(f"`{kind}`" for kind, cls in STEP_TYPES.items() if cls.from_conversation)
        raise PresetError(f"pipeline {name!r}: the first step must be one of {firsts} (it makes the first "
                          "responses from the conversation)")
    try:
        return Pipeline(name, tuple(steps), str(data.get("description", "")))
    except ValueError as exc:  # a step's inputs name no earlier step
        raise PresetError(str(exc)) from None


def parse_pipelines(data: Mapping[str, Any], models: Collection[str] | None = None,
                    routers: Collection[str] | None = None) -> dict[str, Pipeline]:
    overlap = sorted(set(data) & set(models or ()))
    if overlap:
        raise PresetError(f"pipeline name(s) {overlap} are also model names; a request could not tell them apart")
    return {name: parse_pipeline(name, body, models, routers) for name, body in data.items()}
