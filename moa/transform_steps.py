"""Transform steps: reshape the current list of responses without an engine call (handlers: moa/transforms.py).

Registered in moa/steps.py's one table of step kinds, like every step; moa/presets.py imports this module so
that models.yaml may name them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from moa.steps import Step, _require, step_kind
from moa.votes import Normalize


@dataclass(frozen=True, slots=True)
class Transform(Step):
    """Reshapes the list of responses without an engine call (moa/transforms.py)."""


@step_kind("shuffle")
@dataclass(frozen=True, slots=True)
class Shuffle(Transform):
    seed: int | None = None


@step_kind("dropout")
@dataclass(frozen=True, slots=True)
class Dropout(Transform):
    """Drop each response with probability `rate` (never all of them)."""

    rate: float = 0.2
    seed: int | None = None

    def __post_init__(self) -> None:
        Step.__post_init__(self)
        _require(0 <= self.rate <= 1, f"rate must be between 0 and 1, got {self.rate}")


@step_kind("sample")
@dataclass(frozen=True, slots=True)
class Sample(Transform):
    k: int = 3
    seed: int | None = None


@step_kind("take")
@dataclass(frozen=True, slots=True)
class Take(Transform):
    k: int = 1


@step_kind("filter")
@dataclass(frozen=True, slots=True)
class Filter(Transform):
    """Keep responses with at least `min_chars` characters that match `pattern` (a regex), if given, and
    (after a `check`) that passed `all` of their checks or `any` one."""

    min_chars: int = 1
    pattern: str | None = None
    passed_checks: Literal["all", "any"] | None = None

    def __post_init__(self) -> None:
        Step.__post_init__(self)
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {exc}") from None


@step_kind("map")
@dataclass(frozen=True, slots=True)
class Map(Transform):
    """Rewrite each response: strip | first_line | final_answer (the text after the last 'answer:')."""

    op: Literal["strip", "first_line", "final_answer"] = "strip"


@step_kind("majority-vote")
@dataclass(frozen=True, slots=True)
class MajorityVote(Transform):
    """Self-consistency without an LLM call: keep one response carrying the most common normalised answer."""

    normalize: Normalize = "text"
