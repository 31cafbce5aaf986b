"""What a step handler sees, and the one table from step class to handler.

A handler is `async (ctx, step, responses) -> responses`. It is registered with
`@handles(StepClass)` next to its code (moa/handlers.py and moa/cascade.py for LLM steps,
moa/transforms.py for the rest); the runner looks it up, nothing else dispatches
on step types.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from moa.calls import EngineCalls
from moa.engine import ChatMessage, Generation, SamplingParams
from moa.routing import Scorer
from moa.steps import LLMStep, Step
from moa.trace import StepNote, StepRecord


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """What a `check` step found for one response: how many checks passed, and what each produced."""

    passed: int
    total: int
    outputs: tuple[str, ...] = ()  # per check: the output (or error) the code gave, for agreement

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


class CodeRunner(Protocol):
    """Runs a Python program in a sandbox (serving/sandbox.py); never in the caller's own process."""

    async def run_python(self, source: str) -> Any:
        """A result with `.status` ("passed" when it exited 0) and `.stdout`."""
        ...


@dataclass(slots=True)
class Response:
    text: str
    model: str
    step: str
    layer: int
    data: dict | None = None  # structured output (council)
    checks: CheckOutcome | None = None  # set by a `check` step (moa/code_checks.py)
    origin: tuple[int, int] | None = None  # (call in the trace, sample index) that wrote it, where known


class LayerFailed(Exception):
    """A step produced nothing usable; the runner falls back to the previous responses or gives up."""

    def __init__(self, reason: str, failures: list[str]) -> None:
        super().__init__(reason)
        self.failures = failures


@dataclass(slots=True)
class StepContext:
    conversation: list[ChatMessage]
    calls: EngineCalls
    index: int  # position of the step in the pipeline
    layer: int  # LLM layers so far, this one included
    record: StepRecord
    failures: list[str]  # the run's failed calls, for the error message if the run gives up
    seed: int | None  # the request's seed
    writes_answer: bool  # the pipeline's last step: stream the call that writes the final answer
    scorers: Mapping[str, Scorer] = field(default_factory=dict)  # routers by name (`route` steps)
    code_runner: CodeRunner | None = None  # the sandbox `check` steps run code in; None: code execution is off

    def note(self, text: str) -> None:
        """A decision: kept in the trace and sent as a progress event."""
        self.record.notes.append(text)
        self.calls.emit(StepNote(self.record.step, self.layer, text))

    def base_seed(self, step: LLMStep) -> int | None:
        return step.seed if step.seed is not None else self.seed

    def params(self, step: LLMStep, *, n: int = 1, temperature: float | None = None, seed: int | None = None,
               json_schema: dict | None = None, logprobs: bool = False) -> SamplingParams:
        return SamplingParams(n=n, temperature=step.temperature if temperature is None else temperature,
                              top_p=step.top_p, max_tokens=step.max_tokens, seed=seed, stop=step.stop,
                              json_schema=json_schema, logprobs=logprobs)

    async def call(self, step: LLMStep, model: str, messages: list[ChatMessage], params: SamplingParams, *,
                   stream_answer: bool = False, need: int | None = None, essential: bool = False) -> list[str]:
        return (await self.generation(step, model, messages, params, stream_answer=stream_answer, need=need,
                                      essential=essential)).texts

    async def generation(self, step: LLMStep, model: str, messages: list[ChatMessage], params: SamplingParams, *,
                         stream_answer: bool = False, need: int | None = None, essential: bool = False) -> Generation:
        """One engine call (moa/calls.py); `essential`: it makes the first answer (the ceiling never refuses it)."""
        return await self.calls.generation(step.kind, self.layer, model, messages, params, timeout_s=step.timeout_s,
                                           stream_answer=stream_answer and self.writes_answer, need=need,
                                           essential=essential)


Handler = Callable[[StepContext, Step, list[Response]], Awaitable[list[Response]]]
HANDLERS: dict[type[Step], Handler] = {}


def handles(step_class: type[Step]) -> Callable[[Handler], Handler]:
    """Register the handler for one step class."""

    def register(handler: Handler) -> Handler:
        HANDLERS[step_class] = handler
        return handler

    return register


def handler_for(step: Step) -> Handler:
    for cls in type(step).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    raise TypeError(f"no handler registered for step {step.kind or type(step).__name__!r}")
