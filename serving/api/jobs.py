"""What a request runs: one job type per target kind, each with a complete and a streamed form.

- `ChatJob`: /v1/chat/completions on a base model, straight to its engine.
- `TextJob`: /v1/completions on a base model (a raw prompt, no chat template).
- `PipelineJob`: /v1/chat/completions on a pipeline; the answer streams from the runner.

`complete()` returns the OpenAI response body, `chunks()` yields the OpenAI stream
chunks; serving/api/delivery.py owns slots, timeouts, disconnects and errors.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import asdict, dataclass, field

from moa.engine import Completion, Delta, Engine, Generation, SamplingParams
from moa.pipeline import Pipeline
from moa.runner import Ceiling, RunResult, iter_run
from moa.trace import (
    AnswerDelta,
    AnswerRestarted,
    CallDelta,
    CallFinished,
    CallStarted,
    CheckFinished,
    Event,
    StepFinished,
    StepNote,
    StepStarted,
)
from serving.api.errors import APIError
from serving.api.schemas import MoAOptions
from serving.api.state import ServerState

EVENT_NAMES = {StepStarted: "layer_started", StepFinished: "layer_finished", CallStarted: "call_started",
               CallDelta: "call_delta", CallFinished: "call_finished", StepNote: "decision", CheckFinished: "check"}


@dataclass
class Envelope:
    """The fields every response body and chunk of one request shares."""

    model: str
    object: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    def __call__(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class ChatJob:
    state: ServerState
    model: str
    engine: Engine
    prompt: list | str
    params: SamplingParams
    include_usage: bool = False
    use_cache: bool = True  # `moa.cache: false` turns the response cache off for this request
    id: str = field(default_factory=_request_id)

    def models(self) -> tuple[str, ...]:
        """The models whose engines answer it."""
        return (self.model,)

    def envelope(self, stream: bool) -> Envelope:
        return Envelope(self.model, "chat.completion.chunk" if stream else "chat.completion", f"chatcmpl-{self.id}")

    def choice(self, c: Completion) -> dict:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason, "logprobs": None}

    def delta_choice(self, d: Delta, first: bool) -> dict:
        delta = {"role": "assistant", "content": d.text} if first else {"content": d.text}
        return {"index": d.index, "delta": delta, "finish_reason": d.finish_reason, "logprobs": None}

    async def complete(self) -> dict:
        generation = await self.engine.generate(self.prompt, self.params, request_id=self.id)
        self.state.metrics.count_generation(self.model, generation)
        return self.envelope(False)([self.choice(c) for c in generation.completions], usage=_usage_of(generation))

    async def chunks(self) -> AsyncIterator[dict]:
        envelope, started = self.envelope(True), set()
        async with aclosing(self.engine.stream(self.prompt, self.params, request_id=self.id)) as events:
            async for event in events:
                if isinstance(event, Delta):
                    yield envelope([self.delta_choice(event, event.index not in started)])
                    started.add(event.index)
                    continue
                self.state.metrics.count_generation(self.model, event)
                if self.include_usage:
                    yield envelope([], usage=_usage_of(event))


class TextJob(ChatJob):
    def envelope(self, stream: bool) -> Envelope:
        return Envelope(self.model, "text_completion", f"cmpl-{self.id}")

    def choice(self, c: Completion) -> dict:
        return {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}

    def delta_choice(self, d: Delta, first: bool) -> dict:
        return {"index": d.index, "text": d.text, "finish_reason": d.finish_reason, "logprobs": None}


def _usage_of(generation: Generation) -> dict:
    return usage(generation.prompt_tokens, generation.completion_tokens, generation.cached_prompt_tokens)


@dataclass
class PipelineJob:
    state: ServerState
    model: str
    pipeline: Pipeline
    messages: list
    options: MoAOptions
    seed: int | None = None
    include_usage: bool = False
    id: str = field(default_factory=_request_id)

    def models(self) -> tuple[str, ...]:
        """The models whose engines answer it (after the request's overrides)."""
        return tuple(self.pipeline.models())

    @property
    def use_cache(self) -> bool:
        return self.options.cache

    def run(self, stream_calls: bool = False) -> AsyncIterator:
        return iter_run(self.pipeline, self.messages, self.state.engines, prices=self.state.registry.prices(),
                        seed=self.seed, scorers=self.state.registry.scorers(),
                        ceiling=Ceiling(self.options.max_total_tokens, self.options.max_cost_usd),
                        stream_calls=stream_calls, code_runner=self.state.code_runner)

    async def complete(self) -> dict:
        result: RunResult | None = None
        async with aclosing(self.run()) as items:
            async for item in items:
                result = item if isinstance(item, RunResult) else result
        assert result is not None  # iter_run ends with its RunResult or raises
        self.state.metrics.count_run(self.model, result)
        choice = {"index": 0, "message": {"role": "assistant", "content": result.answer}, "finish_reason": "stop",
                  "logprobs": None}
        return Envelope(self.model, "chat.completion", f"chatcmpl-{self.id}")(
            [choice], usage=self._usage(result), moa=self.summary(result))

    async def chunks(self) -> AsyncIterator[dict]:
        """Progress events (opt-in) as `choices: []` chunks; the role goes out with the first answer token.

        When the call writing the answer fails part-way, the runner falls back to the previous responses and
        sends AnswerRestarted: the text streamed so far is void. A client that asked for events (`moa.events`,
        or `moa.call_deltas`, which implies them) reads `choices: []` chunks, so it gets the `answer_restarted`
        event, then the fallback whole. A plain OpenAI client skips such chunks and would join the void text
        to the fallback; text already sent cannot be taken back, and holding the answer until its writer is
        done would end streaming. So a plain stream ends with an error event instead (`_broken_off`: the
        official client raises it) and never receives the fallback's text; the non-streaming request, or the
        same one with `moa.events`, returns that fallback. A writer that fails before streaming any text
        voids nothing: the runner sends no AnswerRestarted, and the fallback streams as the answer.
        """
        envelope = Envelope(self.model, "chat.completion.chunk", f"chatcmpl-{self.id}")
        watching = self.options.events or self.options.call_deltas
        first, broken = True, None
        async with aclosing(self.run(stream_calls=self.options.call_deltas)) as items:
            async for item in items:
                if isinstance(item, AnswerDelta):
                    if broken is not None:  # the fallback: this stream already sent other text as its answer
                        continue
                    delta = {"role": "assistant", "content": item.text} if first else {"content": item.text}
                    first = False
                    yield envelope([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])
                elif isinstance(item, AnswerRestarted):  # the text before it is void
                    if watching:
                        yield envelope([], moa={"event": "answer_restarted", **asdict(item)})
                    else:
                        broken = item
                elif isinstance(item, RunResult):
                    self.state.metrics.count_run(self.model, item)  # the engine calls ran either way
                    if broken is not None:
                        raise self._broken_off(broken)
                    yield envelope([{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}])
                    extra = {"usage": self._usage(item)} if self.include_usage else {}
                    yield envelope([], moa=self.summary(item), **extra)
                elif watching:
                    yield envelope([], moa={"event": event_name(item), **asdict(item)})

    def _broken_off(self, restart: AnswerRestarted) -> APIError:
        """The error that ends a plain stream whose answer broke off: what failed, and where the answer is."""
        step = self.pipeline.steps[-1].kind
        return APIError(503, f"the answer broke off: the {step} step writing it failed after {restart.discarded} "
                             f"characters were streamed ({restart.reason}), so the text this stream sent is void. "
                             f"Pipeline {self.model!r} fell back to its previous responses; the same request "
                             "without stream, or with moa.events (an answer_restarted event, then the fallback), "
                             "returns that answer", code="answer_broken_off")

    def _usage(self, result: RunResult) -> dict:
        u = result.usage
        return usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)

    def summary(self, result: RunResult) -> dict:
        """The `moa` field: what the run did, per layer, and its full trace when asked for."""
        u = result.usage
        layers = [{"layer": s.layer, "step": s.step, "seconds": round((s.end_s or 0) - s.start_s, 3),
                   "responses": s.outputs, "notes": s.notes} for s in result.trace.steps]
        summary = {"pipeline": result.trace.pipeline, "engine_calls": u.engine_calls, "cost_usd": u.cost_usd,
                   "total_s": result.trace.total_s, "layers": layers, "data": result.data}
        if self.options.trace:
            summary["trace"] = result.trace.to_dict()
        return summary


def event_name(event: Event) -> str:
    return EVENT_NAMES.get(type(event), type(event).__name__)


Job = ChatJob | TextJob | PipelineJob

