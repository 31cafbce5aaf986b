"""Pipeline steps: small immutable values, so a pipeline is data (presets live in models.yaml).

A step class is registered once, under the kind name YAML, traces, events, `/v1/models`
and the benchmark all use (`@step_kind("aggregate-seq")`); its handler is registered
beside the runner (`moa/handlers.py`, `moa/cascade.py`, `moa/transforms.py`). Values are checked when a
step is built, so a bad preset fails when models.yaml loads, not per request.

LLM steps call engines (here); transforms reshape the current list of responses without a call
(moa/transform_steps.py, registered in the same table).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar, TypeVar

from moa.prompts import Layout, ReferenceBudget, StrategyName
from moa.votes import Normalize

STEP_TYPES: dict[str, type[Step]] = {}  # kind -> class, in registration order
S = TypeVar("S", bound="type[Step]")


def step_kind(kind: str) -> Callable[[S], S]:
    """Register a step class under `kind`, the one name every layer uses for it."""

    def register(cls: S) -> S:
        if kind in STEP_TYPES and STEP_TYPES[kind] is not cls:
            raise ValueError(f"step kind {kind!r} is already registered by {STEP_TYPES[kind].__name__}")
        cls.kind = kind
        STEP_TYPES[kind] = cls
        return cls

    return register


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class Step:
    """Base of every step; `kind` is set by `@step_kind`."""

    kind: ClassVar[str] = ""
    from_conversation: ClassVar[bool] = False  # makes responses from the conversation alone (a first step)
    # The earlier steps whose responses this step works on, in order (their numbers from 1, or their kinds: the
    # latest earlier step of that kind); empty: the previous step's. E.g. an aggregate reading the proposals
    # and a critique of them (`inputs: [propose, critique]`). The pipeline resolves kinds to numbers.
    inputs: tuple[int | str, ...] = ()

    def __post_init__(self) -> None:
        for name, minimum in _MINIMUMS.items():
            value = getattr(self, name, None)
            _require(value is None or value >= minimum, f"{name} must be >= {minimum}, got {value}")
        _require(not (self.inputs and self.from_conversation),
                 f"`inputs` applies to steps that work on earlier responses; {self.kind} answers the conversation")
        _require(all(not isinstance(i, int) or i >= 1 for i in self.inputs), "`inputs` step numbers start at 1")


_MINIMUMS = {"max_tokens": 1, "samples": 1, "k": 1, "window": 1, "min_chars": 0}


@dataclass(frozen=True, slots=True)
class LLMStep(Step):
    """A step that calls engines. One model (`model`) or several (`models`), named the same way everywhere."""

    temperature: float = 0.7
    max_tokens: int = 512
    prompt: str | None = None  # replaces the step's instruction text
    timeout_s: float | None = None  # per engine call; the call is aborted when it runs over
    seed: int | None = None
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        Step.__post_init__(self)
        _require(0 <= self.temperature <= 2, f"temperature must be between 0 and 2, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.timeout_s is None or self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s}")
        names = self.models_used()
        _require(bool(names) and all(names), "`models` must name at least one model" if hasattr(self, "models")
                 else "`model` is required")

    def models_used(self) -> tuple[str, ...]:
        models = getattr(self, "models", None)
        return tuple(dict.fromkeys(models)) if models is not None else (getattr(self, "model", ""),)

    def with_models(self, mapping: Mapping[str, str]) -> LLMStep:
        if hasattr(self, "models"):
            return replace(self, models=tuple(mapping.get(m, m) for m in self.models))  # type: ignore[attr-defined]
        return replace(self, model=mapping.get(self.model, self.model))  # type: ignore[attr-defined]


@step_kind("propose")
@dataclass(frozen=True, slots=True)
class Propose(LLMStep):
    """Every model answers the conversation. A model listed k times (or `samples: k`) is one n=k request."""

    from_conversation: ClassVar[bool] = True
    models: tuple[str, ...] = ()
    samples: int = 1
    # Diversity: sample i gets temperature + offsets[i % len] and system prompt role_prompts[i % len].
    temperature_offsets: tuple[float, ...] = ()
    role_prompts: tuple[str, ...] = ()
    quorum: int | None = None  # go on once this many responses are in; abort the rest
    min_success: int = 1
    # Escalation after a `check`: run only when no current response passes every check, and add the new
    # responses to the current ones (adaptive code: greedy first, samples only where it fails an example).
    unless_passing: bool = False

    @property
    def total(self) -> int:
        return len(self.models) * self.samples

    def sample_temperature(self, i: int) -> float:
        """The temperature sample i is drawn at (offsets cycle over the samples; never below greedy)."""
        offset = self.temperature_offsets[i % len(self.temperature_offsets)] if self.temperature_offsets else 0.0
        return max(0.0, self.temperature + offset)

    def __post_init__(self) -> None:
        LLMStep.__post_init__(self)
        _require(self.quorum is None or 1 <= self.quorum <= self.total,
                 f"quorum {self.quorum} must be between 1 and the {self.total} samples")
        _require(1 <= self.min_success <= self.total,
                 f"min_success {self.min_success} must be between 1 and the {self.total} samples")
        _require(self.total == len(set(self.models)) or self.temperature > 0 or bool(self.temperature_offsets),
                 "sampling one model several times needs temperature > 0")


@dataclass(frozen=True, slots=True)
class Synthesis(LLMStep):
    """Steps that write from references: the strategy says how, the layout where they go."""

    strategy: StrategyName = "moa"
    layout: Layout | None = None  # None: the strategy's default
    budget: ReferenceBudget = field(default_factory=ReferenceBudget)


@step_kind("check")
@dataclass(frozen=True, slots=True)
class Check(Step):
    """Run each response's code against checks taken from the conversation: the docstring examples
    (`>>> f(x)` then the expected output) and `assert` lines the user sent (moa/code_checks.py).

    Runs model-written code, so only where the caller gave a sandbox (`moa serve --allow-code-execution`,
    `moa eval`). Records per response how many checks pass; `order` sorts the most-passing first (ties:
    the response whose outputs on the checks most others share, then the original order), so `take`
    after it is best-of-n, `filter: {passed_checks: all}` keeps the passing ones, and a synthesis sees
    "passes k of n" beside each reference.
    """

    order: bool = True
    check_timeout_s: float = 2.0  # per check inside the sandbox (an endless loop fails that check only)


@step_kind("synthesize")
@dataclass(frozen=True, slots=True)
class Synthesize(Synthesis):
    """A layer: each model writes a new response with the previous layer's responses as references."""

    models: tuple[str, ...] = ()
    quorum: int | None = None
    min_success: int = 1

    def __post_init__(self) -> None:
        Synthesis.__post_init__(self)
        _require(self.quorum is None or 1 <= self.quorum <= len(self.models),
                 f"quorum {self.quorum} must be between 1 and the {len(self.models)} models")
        _require(1 <= self.min_success <= len(self.models),
                 f"min_success {self.min_success} must be between 1 and the {len(self.models)} models")


@step_kind("critique")
@dataclass(frozen=True, slots=True)
class Critique(Synthesize):
    """Each model critiques the references (what each gets right, its errors, what a right answer needs)
    instead of answering; a later step reads the critique beside the answers it judged (`inputs`), as
    optillm's mixture of agents does."""

    strategy: StrategyName = "critique"


@step_kind("aggregate")
@dataclass(frozen=True, slots=True)
class Aggregate(Synthesis):
    """One model writes the final answer from the references."""

    model: str = ""


@step_kind("aggregate-seq")
@dataclass(frozen=True, slots=True)
class AggregateSeq(Synthesis):
    """Self-MoA-Seq: fold the responses in windows, carrying the running aggregate into the next window."""

    model: str = ""
    window: int = 3
    strategy: StrategyName = "self-moa"


@dataclass(frozen=True, slots=True)
class Cascade(Synthesis):
    """Answer cheaply first; spend more only where that answer looks unsure (`adaptive`, `route`).

    Unsure: it ran out of tokens, or its least likely token's log-probability is below `min_logprob` (an
    engine that gives no log-probabilities always escalates). Escalation draws `samples` more from the
    strongest model in one n=k request; if every one agrees with its answer (`agree`: how answers are
    compared) it stands, else the strongest model synthesizes all of them with `strategy`.
    """

    from_conversation: ClassVar[bool] = True
    min_logprob: float = -1.4
    samples: int = 3
    agree: Normalize = "number"
    strategy: StrategyName = "self-moa"

    def __post_init__(self) -> None:
        Synthesis.__post_init__(self)
        _require(self.min_logprob <= 0, f"min_logprob is a log-probability (<= 0), got {self.min_logprob}")
        _require(self.temperature > 0, "the escalation samples need temperature > 0")


@step_kind("adaptive")
@dataclass(frozen=True, slots=True)
class Adaptive(Cascade):
    """One greedy answer from `model`; more samples and a synthesis only where it looks unsure (adaptive Self-MoA)."""

    model: str = ""


@step_kind("route")
@dataclass(frozen=True, slots=True)
class Route(Cascade):
    """A router picks who answers first: the cheapest of `models` (listed cheapest first) whose predicted
    success reaches `min_score` (default: the router's fitted threshold), else the likeliest. Unsure → the
    likeliest model answers too; two answers that agree stand; else its samples, then a synthesis.
    """

    models: tuple[str, ...] = ()
    router: str = ""  # a router named under `routers:` in models.yaml
    min_score: float | None = None

    def __post_init__(self) -> None:
        Cascade.__post_init__(self)
        _require(bool(self.router), "`router` is required (a name under `routers:` in models.yaml)")
        _require(self.min_score is None or 0 <= self.min_score <= 1,
                 f"min_score is a probability (0..1), got {self.min_score}")


@step_kind("refine")
@dataclass(frozen=True, slots=True)
class Refine(LLMStep):
    """Each response is improved by a model (models used round-robin), one call per response."""

    models: tuple[str, ...] = ()


@step_kind("rank")
@dataclass(frozen=True, slots=True)
class Rank(LLMStep):
    """A judge model orders the responses; the best k are kept (best-of-n)."""

    model: str = ""
    k: int = 1
    temperature: float = 0.0
    max_tokens: int = 64


@step_kind("vote")
@dataclass(frozen=True, slots=True)
class Vote(LLMStep):
    """A judge model picks the answer most responses agree on; that response is kept."""

    model: str = ""
    temperature: float = 0.0
    max_tokens: int = 64


def writes_answer(step: Step) -> bool:
    """Whether the step's own text becomes the answer when it comes last (not a judge's pick, not a transform)."""
    return isinstance(step, LLMStep) and not isinstance(step, Rank | Vote)


def llm_step_kinds() -> set[str]:
    """Kinds of the steps that call engines (trace step names; the benchmark's per-layer timings)."""
    return {kind for kind, cls in STEP_TYPES.items() if issubclass(cls, LLMStep)}
