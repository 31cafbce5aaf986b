"""What a pipeline run did: every engine call and step, with timings, tokens, cost and errors.

Everything here is plain data that serialises to JSON (`Trace.to_dict`), and the
progress events are what a server forwards to a streaming client.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class CallRecord:
    step: str
    layer: int
    model: str
    n: int
    start_s: float  # seconds since the run started
    end_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cost_usd: float = 0.0
    status: str = "running"  # ok | error | timeout | aborted | skipped (the ceiling)
    error: str | None = None
    note: str | None = None
    # The sampling it was sent with and the samples a quorum cut off inside it: whether its answer is fixed by
    # its inputs (greedy or seeded, nothing cut), which the response cache checks before storing a run.
    temperature: float | None = None
    seed: int | None = None
    aborted_samples: int = 0
    # Speculative decoding (engine.speculative): draft tokens the engine proposed for this call, and accepted.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0


@dataclass(slots=True)
class StepRecord:
    step: str
    layer: int
    start_s: float
    end_s: float | None = None
    inputs: int = 0
    outputs: int = 0
    notes: list[str] = field(default_factory=list)
    unseeded: bool = False  # it drew fresh entropy (a shuffle, dropout or sample with no seed): not repeatable


@dataclass(slots=True)
class Usage:
    engine_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Trace:
    pipeline: str
    started_at: float = field(default_factory=time.time)
    _t0: float = field(default_factory=time.perf_counter, repr=False)
    calls: list[CallRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    total_s: float | None = None

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def usage(self) -> Usage:
        u = Usage()
        for c in self.calls:
            if c.status == "skipped":  # refused by the ceiling: it never reached an engine
                continue
            u.engine_calls += 1
            u.prompt_tokens += c.prompt_tokens
            u.completion_tokens += c.completion_tokens
            u.cached_prompt_tokens += c.cached_prompt_tokens
            u.cost_usd += c.cost_usd
        return u

    def critical_path_s(self) -> float:
        """The time no scheduler could save: per layer, from its first call's start to its last call's end
        (the slowest proposer; a sequential fold's calls end to end), summed over the layers.

        A run's total over this is its orchestration overhead: gaps between layers, prompt building, queues.
        """
        spans: dict[int, tuple[float, float]] = {}
        for c in self.calls:
            if c.end_s is None:
                continue
            start, end = spans.get(c.layer, (c.start_s, c.end_s))
            spans[c.layer] = (min(start, c.start_s), max(end, c.end_s))
        return sum(end - start for start, end in spans.values())

    def to_dict(self) -> dict[str, Any]:
        usage = self.usage()
        return {
            "pipeline": self.pipeline,
            "started_at": self.started_at,
            "total_s": self.total_s,
            "usage": {**asdict(usage), "total_tokens": usage.total_tokens},
            "steps": [asdict(s) for s in self.steps],
            "calls": [asdict(c) for c in self.calls],
        }


# -- progress events ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepStarted:
    step: str
    layer: int


@dataclass(frozen=True, slots=True)
class CallStarted:
    """An engine call was sent: `call` is its position in the trace's `calls`, the key of its deltas."""

    call: int
    step: str
    layer: int
    model: str
    n: int


@dataclass(frozen=True, slots=True)
class CallDelta:
    """A streamed piece of sample `index` of call `call` (only when the run streams every call)."""

    call: int
    index: int
    text: str
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class CallFinished:
    """An engine call ended (a proposal is in, or failed), with its figures as the trace records them.

    Samples of the call that never finished (no delta with a finish_reason) were aborted: by a quorum,
    a timeout or the client leaving.
    """

    step: str
    layer: int
    model: str
    status: str
    responses: int
    call: int = -1
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    seconds: float | None = None
    cost_usd: float = 0.0
    error: str | None = None
    note: str | None = None

    @classmethod
    def of(cls, record: CallRecord, call: int, responses: int) -> CallFinished:
        seconds = None if record.end_s is None else record.end_s - record.start_s
        return cls(record.step, record.layer, record.model, record.status, responses, call, record.prompt_tokens,
                   record.cached_prompt_tokens, record.completion_tokens, record.ttft_s, seconds, record.cost_usd,
                   record.error, record.note)


@dataclass(frozen=True, slots=True)
class StepFinished:
    step: str
    layer: int
    responses: int
    seconds: float


@dataclass(frozen=True, slots=True)
class StepNote:
    """A decision a step made (routing scores, agreement, why it stopped or escalated); also in the trace."""

    step: str
    layer: int
    text: str


@dataclass(frozen=True, slots=True)
class CheckFinished:
    """A `check` step ran one response's code: `call` and `index` name the engine call and sample that wrote it
    (-1 when not known), so a viewer can mark that answer."""

    step: str
    layer: int
    call: int
    index: int
    model: str
    passed: int
    total: int


@dataclass(frozen=True, slots=True)
class AnswerDelta:
    """A chunk of the final answer, streamed by the pipeline's last LLM step."""

    text: str


@dataclass(frozen=True, slots=True)
class AnswerRestarted:
    """The call writing the answer failed part-way: the `discarded` characters streamed so far are void, and
    the answer the fault rules kept (the previous responses' first) follows, whole."""

    discarded: int
    reason: str


Event = (StepStarted | CallStarted | CallDelta | CallFinished | StepNote | CheckFinished | StepFinished | AnswerDelta
         | AnswerRestarted)
