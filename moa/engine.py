"""The one small async protocol every engine implements.

The orchestrator only ever talks to engines through this module, which is why it
can stay free of torch and vLLM: an engine turns a conversation plus sampling
parameters into n completions with their token counts and timings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypedDict, runtime_checkable

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "abort", "error"]


class ChatMessage(TypedDict):
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What one engine request asks for.

    With n > 1 the engine samples n completions of one shared prompt in a single
    request (one prefill). A seed makes sample i use seed + i, so n=k with seed s
    reproduces k separate requests seeded s, s+1, ... s+k-1.
    """

    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Constrain the output to this JSON schema (guided decoding where the engine supports it).
    json_schema: dict | None = field(default=None, hash=False, compare=False)
    # Ask for each completion's log-probability (a confidence signal); engines that cannot give None.
    logprobs: bool = False
    # Scheduling priority, lower first, for engines that schedule by priority (vLLM with
    # scheduling_policy: priority); others ignore it. The runner sets it from the call's layer.
    priority: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n={self.n} needs temperature > 0: greedy samples would all be identical")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True, slots=True)
class Completion:
    index: int
    text: str
    completion_tokens: int
    finish_reason: FinishReason
    logprob: float | None = None  # sum over the sampled tokens, when asked for (SamplingParams.logprobs)
    min_logprob: float | None = None  # the least likely token chosen: one unsure step in a confident answer
    # Speculative decoding, where the engine runs it: draft tokens proposed for this completion, and accepted.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def mean_logprob(self) -> float | None:
        """Per-token log-probability: exp() of it is the geometric-mean probability of the tokens chosen."""
        return None if self.logprob is None else self.logprob / max(1, self.completion_tokens)


@dataclass(frozen=True, slots=True)
class Generation:
    """The result of one engine request: n completions of one prompt."""

    model: str
    completions: tuple[Completion, ...]
    prompt_tokens: int
    cached_prompt_tokens: int
    ttft_s: float | None
    total_s: float
    call: int = -1  # its position in the run's trace (set by the orchestrator: events name calls by it)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions)

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


@dataclass(frozen=True, slots=True)
class Delta:
    """A streamed piece of completion `index`; the stream ends with a Generation."""

    index: int
    text: str
    finish_reason: FinishReason | None = None


StreamEvent = Delta | Generation


@dataclass(slots=True)
class EngineStats:
    """Live counters an engine keeps; tests and metrics read them."""

    running: int = 0
    started: int = 0
    finished: int = 0
    aborted: int = 0
    errors: int = 0
    restarts: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def begin(self) -> None:
        self.started += 1
        self.running += 1

    def end(self, outcome: Literal["finished", "aborted", "error"]) -> None:
        self.running -= 1
        if outcome == "finished":
            self.finished += 1
        elif outcome == "aborted":
            self.aborted += 1
        else:
            self.errors += 1


class EngineError(RuntimeError):
    """An engine could not serve a request; the message names the model and the cause."""


class InvalidRequest(ValueError):
    """The request itself is wrong (bad messages, prompt beyond the context): the caller's fault, a 4xx.
    `param`: the request field at fault, for the API's error body."""

    def __init__(self, message: str, *, param: str = "max_tokens") -> None:
        super().__init__(message)
        self.param = param


@runtime_checkable
class Engine(Protocol):
    """An engine serves one model.

    `messages` is a conversation, templated with the model's chat template; a plain
    string is a raw prompt sent as is (OpenAI's /v1/completions).
    Cancellation is asyncio cancellation: cancelling the task awaiting
    `generate`, or closing the iterator returned by `stream`, aborts the request
    inside the engine so no work leaks.
    """

    name: str
    stats: EngineStats

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes in this model: reference budgets, and counts after a quorum cut a stream."""
        ...

    async def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        request_id: str | None = None,
    ) -> Generation: ...

    def stream(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        request_id: str | None = None,
    ) -> AsyncIterator[StreamEvent]: ...


class StreamingEngine:
    """Base for engines whose native form is a stream: `generate` drains `stream`."""

    def stream(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
               request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """An estimate (4 characters a token) for engines without a tokenizer at hand; others override it."""
        return max(1, len(text) // 4)

    async def generate(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                       request_id: str | None = None) -> Generation:
        return await collect(self.stream(messages, params, request_id=request_id))


def finish_reason(reason: str | None) -> FinishReason | None:
    """Map a backend's finish reason onto ours ("stop_sequence", "eos" and the like become "stop")."""
    if reason is None:
        return None
    return reason if reason in ("stop", "length", "abort") else "stop"  # type: ignore[return-value]


async def collect(events: AsyncIterator[StreamEvent]) -> Generation:
    """Drain a stream and return its final Generation (for engines whose native form is a stream)."""
    final: Generation | None = None
    async for event in events:
        if isinstance(event, Generation):
            final = event
    if final is None:
        raise EngineError("engine stream ended without a final result")
    return final


def validate_messages(messages: Sequence[ChatMessage] | str) -> None:
    """Reject conversations an engine cannot template, with a message a user can act on."""
    if isinstance(messages, str):
        if not messages:
            raise InvalidRequest("prompt must not be empty")
        return
    if not messages:
        raise InvalidRequest("messages must contain at least one message")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise InvalidRequest(f"messages[{i}].role must be system, user or assistant, got {role!r}")
        if not isinstance(message.get("content"), str):
            raise InvalidRequest(f"messages[{i}].content must be a string")
