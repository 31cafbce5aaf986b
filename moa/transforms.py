"""Transforms: reshape the list of responses without an engine call. Pure functions of their inputs.

Each gets its own random generator: seeded from the step's seed, else the request's
seed (plus the step's position, so two shuffles differ), else from fresh entropy, so
an unseeded request does not drop the same proposers every time.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from moa.context import Response, StepContext, handles
from moa.transform_steps import Dropout, Filter, MajorityVote, Map, Sample, Shuffle, Take, Transform
from moa.votes import majority

Pure = Callable[[Transform, list[Response], random.Random, list[str]], list[Response]]  # notes appended to the list


def transform(step_class: type[Transform]) -> Callable[[Pure], Pure]:
    """Register a pure transform as the handler of `step_class`."""

    def register(fn: Pure) -> Pure:
        async def handler(ctx: StepContext, step: Transform, current: list[Response]) -> list[Response]:
            return fn(step, current, rng_for(step, ctx), ctx.record.notes)

        handles(step_class)(handler)  # type: ignore[arg-type]
        return fn

    return register


def rng_for(step: Transform, ctx: StepContext) -> random.Random:
    """The step's generator; a step that draws (it has a `seed` field) from fresh entropy is marked `unseeded`
    in the trace, so its answer is known not to repeat (the response cache never stores it)."""
    seed = getattr(step, "seed", None)
    seed = seed if seed is not None else ctx.seed
    if seed is None and hasattr(step, "seed"):
        ctx.record.unseeded = True
    return random.Random(None if seed is None else seed + ctx.index)  # None: fresh entropy


@transform(Shuffle)
def shuffle(step: Shuffle, current: list[Response], rng: random.Random, notes: list[str]) -> list[Response]:
    out = list(current)
    rng.shuffle(out)
    return out


@transform(Dropout)
def dropout(step: Dropout, current: list[Response], rng: random.Random, notes: list[str]) -> list[Response]:
    kept = [r for r in current if rng.random() >= step.rate]
    if not kept and current:
        kept = [rng.choice(current)]
        notes.append("dropout would drop everything: one response kept")
    return kept


@transform(Sample)
def sample(step: Sample, current: list[Response], rng: random.Random, notes: list[str]) -> list[Response]:
    return rng.sample(current, min(step.k, len(current)))


@transform(Take)
def take(step: Take, current: list[Response], rng: random.Random, notes: list[str]) -> list[Response]:
    return current[:step.k]


@transform(Filter)
def filter_responses(step: Filter, current: list[Response], rng: random.Random, notes: list[str]) -> list[Response]:
    pattern = re.compile(step.pattern) if step.pattern else None
    kept = [r for r in current if len(r.text.strip()) >= step.min_chars and (pattern is None or pattern.search(r.text))
            and _passed(r, step.passed_checks)]
    if not kept and current:
        notes.append("filter removed every response: previous responses kept")
        return current
    return kept


def _passed(response: Response, rule: str | None) -> bool:
    """`filter: {passed_checks: all|any}`: the response's `check` result allows it (no rule: everything does)."""
    if rule is None:
        return True
    c = response.checks
    if c is None or c.total == 0:  # nothing was checked: nothing to filter on
        return True
    return c.all_passed if rule == "all" else c.passed > 0


@transform(Map)
def map_responses(step: Map, current: list[Response], rng: random.Random, notes: list[str]) -> list[Response]:
    out = []
    for r in current:
        text = apply_map(step.op, r.text)
        # A changed text is another program: its check result no longer applies.
        out.append(Response(text, r.model, r.step, r.layer, r.data, r.checks if text == r.text else None, r.origin))
    return out


@transform(MajorityVote)
def majority_vote(step: MajorityVote, current: list[Response], rng: random.Random,
                  notes: list[str]) -> list[Response]:
    winner, tally = majority([r.text for r in current], step.normalize)
    notes.append(f"votes: {dict(tally)}")
    return [current[winner]] if current else []


def apply_map(op: str, text: str) -> str:
    if op == "strip":
        return text.strip()
    if op == "first_line":
        return text.strip().splitlines()[0] if text.strip() else ""
    if op == "final_answer":
        match = list(re.finditer(r"answer\s*(?:is\s*:?|:)\s*", text, re.IGNORECASE))
        return text[match[-1].end():].strip() if match else text.strip()
    raise ValueError(f"unknown map op {op!r}")
