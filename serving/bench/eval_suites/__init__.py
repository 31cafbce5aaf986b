"""`moa eval --suite NAME`: what a system is asked (items) and how its answers are graded (a scorer).

A suite is one module here with a class that satisfies `Suite`, named in `SUITES`. Items carry only what the
system may see (`conversation()`); whatever grades them (references, unit tests) stays with the suite.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from moa.engine import ChatMessage

# name -> "module:class"; imported on use, so a suite's dependencies load only when it runs.
SUITES = {
    "tasks": "serving.bench.eval_suites.tasks:TaskSuite",
    "humaneval": "serving.bench.eval_suites.humaneval:HumanEval",
}


class Item(Protocol):
    """One thing to answer: `id` names it in the results, `category` groups the accuracy table."""

    @property
    def id(self) -> str: ...

    @property
    def category(self) -> str: ...

    @property
    def scored(self) -> bool:  # False: an open prompt, judged pairwise only
        ...

    def conversation(self) -> list[ChatMessage]: ...


@dataclass(frozen=True, slots=True)
class Published:
    """A figure published for a model on a suite, printed beside the one measured here."""

    pass_at_1: float  # 0..1
    source: str


class Suite(Protocol):
    name: str
    metric: Literal["accuracy", "pass@k"]  # which table the report prints
    max_tokens: int  # the default cap on an answer's tokens: what a complete answer needs

    def describe(self) -> str:
        """What results.json's meta.tasks says was evaluated (a task file's name, or the suite's)."""
        ...

    def load(self) -> list[Item]: ...

    async def score(self, item: Item, response: str) -> bool: ...

    def published(self, model: str) -> Published | None:
        """The published figure for a single model (a registry or served name), if the suite keeps one."""
        ...

    def prepare(self) -> dict[str, str]:
        """Ready the scorer before any engine starts (a missing sandbox fails here, not after an hour of
        answers); returns what the scores depend on beyond the answers, for results.json's meta."""
        ...


def get_suite(name: str, tasks_file: Path | None = None) -> Suite:
    """The suite called `name`; `tasks_file` (--tasks) is the task set of the `tasks` suite only."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}: one of {', '.join(SUITES)}")
    if tasks_file is not None and name != "tasks":
        raise ValueError(f"--tasks is a task file for --suite tasks; suite {name!r} has its own items")
    module, _, cls = SUITES[name].partition(":")
    factory = getattr(importlib.import_module(module), cls)
    return factory(tasks_file) if name == "tasks" else factory()


T = TypeVar("T")


def subset(items: Sequence[T], *, limit: int | None = None, sample: int | None = None,
           seed: int = 0) -> tuple[list[T], str | None]:
    """The first `limit` items, or `sample` of them drawn with `seed` (kept in suite order); and how the report
    names the choice (None: all of them)."""
    if limit and sample:
        raise ValueError("give --limit (the first N) or --sample (N at random), not both")
    if limit and limit < len(items):
        return list(items[:limit]), f"the first {limit} of {len(items)}"
    if sample and sample < len(items):
        picked = sorted(random.Random(seed).sample(range(len(items)), sample))
        return [items[i] for i in picked], f"{sample} of {len(items)} drawn at random with seed {seed}"
    return list(items), None
