"""Pipeline steps: small immutable values, so a pipeline is data (presets live in models.yaml).

LLM steps call engines; transforms reshape the current list of responses without
an LLM call. Every LLM step takes temperature, max_tokens and a prompt override.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Layout = Literal["before", "after"]
StrategyName = Literal["moa", "consensus", "council", "best-of", "chain", "self-moa"]


@dataclass(frozen=True, slots=True)
class ReferenceBudget:
    """Token caps on the references shown to a model: each one, and all of them together."""

    per_reference: int | None = 768
    total: int | None = 2048


@dataclass(frozen=True, slots=True)
class LLMStep:
    temperature: float = 0.7
    max_tokens: int = 512
    prompt: str | None = None  # replaces the step's instruction text
    timeout_s: float | None = None  # per engine call; the call is aborted when it runs over
    seed: int | None = None

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    def models_used(self) -> tuple[str, ...]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Propose(LLMStep):
    """Every model answers the conversation. A model listed k times (or `samples: k`) is one n=k request."""

    models: tuple[str, ...] = ()
    samples: int = 1
    # Diversity: sample i gets temperature + offsets[i % len] and system prompt role_prompts[i % len].
    temperature_offsets: tuple[float, ...] = ()
    role_prompts: tuple[str, ...] = ()
    quorum: int | None = None  # go on once this many responses are in; abort the rest
    min_success: int = 1

    def models_used(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.models))


@dataclass(frozen=True, slots=True)
class _Synthesis(LLMStep):
    strategy: StrategyName = "moa"
    layout: Layout | None = None  # None: the strategy's default
    budget: ReferenceBudget = field(default_factory=ReferenceBudget)


@dataclass(frozen=True, slots=True)
class Synthesize(_Synthesis):
    """A layer: each model writes a new response with the previous layer's responses as references."""

    models: tuple[str, ...] = ()
    quorum: int | None = None
    min_success: int = 1

    def models_used(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.models))


@dataclass(frozen=True, slots=True)
class Aggregate(_Synthesis):
    """One model writes the final answer from the references."""

    model: str = ""

    def models_used(self) -> tuple[str, ...]:
        return (self.model,)


@dataclass(frozen=True, slots=True)
class AggregateSeq(_Synthesis):
    """Self-MoA-Seq: fold the responses in windows, carrying the running aggregate into the next window."""

    model: str = ""
    window: int = 3
    strategy: StrategyName = "self-moa"

    def models_used(self) -> tuple[str, ...]:
        return (self.model,)


@dataclass(frozen=True, slots=True)
class Refine(LLMStep):
    """Each response is improved by a model (models used round-robin), one call per response."""

    models: tuple[str, ...] = ()

    def models_used(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.models))


@dataclass(frozen=True, slots=True)
class Rank(LLMStep):
    """A judge model orders the responses; the best k are kept (best-of-n)."""

    model: str = ""
    k: int = 1
    temperature: float = 0.0
    max_tokens: int = 64

    def models_used(self) -> tuple[str, ...]:
        return (self.model,)


@dataclass(frozen=True, slots=True)
class Vote(LLMStep):
    """A judge model picks the answer most responses agree on; that response is kept."""

    model: str = ""
    temperature: float = 0.0
    max_tokens: int = 64

    def models_used(self) -> tuple[str, ...]:
        return (self.model,)


# -- transforms (no LLM call) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shuffle:
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Dropout:
    """Drop each response with probability `rate` (never all of them)."""

    rate: float = 0.2
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    k: int = 3
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Take:
    k: int = 1


@dataclass(frozen=True, slots=True)
class Filter:
    """Keep responses with at least `min_chars` characters that match `pattern` (a regex), if given."""

    min_chars: int = 1
    pattern: str | None = None


@dataclass(frozen=True, slots=True)
class Map:
    """Rewrite each response: strip | first_line | final_answer (the text after the last 'answer:')."""

    op: Literal["strip", "first_line", "final_answer"] = "strip"


@dataclass(frozen=True, slots=True)
class MajorityVote:
    """Self-consistency without an LLM call: keep one response carrying the most common normalised answer."""

    normalize: Literal["number", "choice", "text"] = "text"


Transform = Shuffle | Dropout | Sample | Take | Filter | Map | MajorityVote
Step = Propose | Synthesize | Aggregate | AggregateSeq | Refine | Rank | Vote | Transform
LLM_STEPS = (Propose, Synthesize, Aggregate, AggregateSeq, Refine, Rank, Vote)


@dataclass(frozen=True, slots=True)
class Pipeline:
    name: str
    steps: tuple[Step, ...]
    description: str = ""

    def models(self) -> tuple[str, ...]:
        """Every model the pipeline calls, in first-use order (the order engines start in)."""
        seen: dict[str, None] = {}
        for step in self.steps:
            if isinstance(step, LLM_STEPS):
                seen.update(dict.fromkeys(step.models_used()))
        return tuple(seen)

    def with_models(self, mapping: dict[str, str]) -> Pipeline:
        """The same pipeline with models substituted (per-request overrides, tests on small models)."""

        def swap(step: Step) -> Step:
            if isinstance(step, (Propose, Synthesize, Refine)):
                return replace(step, models=tuple(mapping.get(m, m) for m in step.models))
            if isinstance(step, (Aggregate, AggregateSeq, Rank, Vote)):
                return replace(step, model=mapping.get(step.model, step.model))
            return step

        return replace(self, steps=tuple(swap(s) for s in self.steps))

    def with_layout(self, layout: Layout) -> Pipeline:
        """Every synthesis step with its references placed `layout` (`moa eval` compares the two)."""
        return replace(self, name=f"{self.name}@{layout}", steps=tuple(
            replace(s, layout=layout) if isinstance(s, _Synthesis) else s for s in self.steps
        ))

    def with_max_tokens(self, cap: int) -> Pipeline:
        """Cap every LLM step's max_tokens (quick runs, tests)."""
        return replace(self, steps=tuple(
            replace(s, max_tokens=min(s.max_tokens, cap)) if isinstance(s, LLM_STEPS) else s for s in self.steps
        ))
