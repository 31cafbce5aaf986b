"""Run a pipeline on one conversation: steps in order, engine calls concurrent within a layer.

`iter_run` is the run: an async generator of progress events and answer chunks,
ending with the `RunResult`; `run` drains it. Each step runs as a task whose
handler (moa/context.py's table) reports through a queue, so a client that stops
reading (closes the generator) cancels the step, which aborts its engine calls.

The answer streams from the pipeline's last step when it is an LLM step that
writes one answer; otherwise (a transform or a judge last) it arrives whole, after
the last step. Either way the AnswerDelta chunks concatenate to `RunResult.answer` — counted
from the last AnswerRestarted, sent when the call writing the answer failed part-way and the
fault rules fell back to the previous responses (the fallback then follows whole).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass

import moa.cascade  # noqa: F401 - registers the adaptive and route handlers
import moa.code_checks  # noqa: F401 - registers the check step's handler
import moa.handlers  # noqa: F401 - registers the LLM step handlers
import moa.transforms  # noqa: F401 - registers the transform handlers
from moa.calls import Ceiling, EngineCalls, Prices
from moa.context import CodeRunner, LayerFailed, Response, StepContext, handler_for
from moa.engine import ChatMessage, Engine, InvalidRequest, validate_messages
from moa.pipeline import Pipeline
from moa.routing import Scorer
from moa.steps import LLMStep, Step
from moa.trace import AnswerDelta, AnswerRestarted, Event, StepFinished, StepRecord, StepStarted, Trace, Usage

EventSink = Callable[[Event], Awaitable[None] | None]
__all__ = ["Ceiling", "PipelineError", "PipelineRun", "Prices", "Response", "RunResult", "iter_run", "run"]


@dataclass(slots=True)
class RunResult:
    answer: str
    responses: list[list[Response]]  # after each step
    trace: Trace
    data: dict | None = None

    @property
    def usage(self) -> Usage:
        return self.trace.usage()


class PipelineError(RuntimeError):
    """Nothing usable came out; the message names each failed model and its cause."""


_STEP_DONE = object()


class PipelineRun:
    """The state of one run: the trace, the failures so far, and the queue handlers report into."""

    def __init__(self, pipeline: Pipeline, conversation: list[ChatMessage], engines: Mapping[str, Engine], *,
                 prices: Prices | None = None, seed: int | None = None, timeout_s: float | None = None,
                 ceiling: Ceiling | None = None, scorers: Mapping[str, Scorer] | None = None,
                 stream_calls: bool = False, code_runner: CodeRunner | None = None) -> None:
        self.pipeline, self.conversation, self.seed = pipeline, conversation, seed
        self.code_runner = code_runner
        self.trace = Trace(pipeline.name)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.calls = EngineCalls(engines, self.trace, self.queue.put_nowait, prices or {}, timeout_s,
                                 ceiling or Ceiling(), stream_calls=stream_calls)
        self.scorers = scorers or {}
        self.failures: list[str] = []
        self.produced: list[list[Response]] = []  # what each step itself produced, for later steps' `inputs`

    async def events(self) -> AsyncIterator[Event | RunResult]:
        current: list[Response] = []
        history: list[list[Response]] = []  # after each step: what went on to the next one
        layer = 0
        last = len(self.pipeline.steps) - 1
        for index, step in enumerate(self.pipeline.steps):
            layer += isinstance(step, LLMStep)
            # A step works on the previous step's responses, or on those of the earlier steps it names.
            given = [r for n in step.inputs for r in self.produced[n - 1]] if step.inputs else current
            record = StepRecord(step.kind, layer, self.trace.now(), inputs=len(given))
            self.trace.steps.append(record)
            yield StepStarted(step.kind, layer)
            ctx = StepContext(self.conversation, self.calls, index, layer, record, self.failures, self.seed,
                              writes_answer=index == last, scorers=self.scorers, code_runner=self.code_runner)
            task = asyncio.create_task(self._step(ctx, step, given, current))
            task.add_done_callback(lambda _: self.queue.put_nowait(_STEP_DONE))
            try:
                while (item := await self.queue.get()) is not _STEP_DONE:
                    yield item
            finally:
                if not task.done():  # the consumer left: cancelling the step aborts its engine calls
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            current, own = task.result()
            record.end_s, record.outputs = self.trace.now(), len(current)
            history.append(list(current))
            self.produced.append(own)  # [] when the step failed
            yield StepFinished(step.kind, layer, len(current), record.end_s - record.start_s)
        self.trace.total_s = self.trace.now()
        if not current:
            raise PipelineError(f"pipeline {self.pipeline.name!r} produced no response")
        answer = current[0].text
        streamed = "".join(self.calls.streamed)
        if streamed != answer:  # nothing streamed (a transform or judge last), or the writer failed part-way
            if streamed:
                yield AnswerRestarted(len(streamed), self.failures[-1] if self.failures else "the writer failed")
            self.calls.streamed[:] = [answer]
            yield AnswerDelta(answer)
        yield RunResult(answer, history, self.trace, current[0].data)

    async def _step(self, ctx: StepContext, step: Step, given: list[Response],
                    current: list[Response]) -> tuple[list[Response], list[Response]]:
        """(what goes on to the next step, what the step itself produced): its responses from `given`, twice;
        on LayerFailed, the answers it was to work on (its first input's, or the previous step's) and nothing,
        unless there are none to fall back on."""
        try:
            if not given and not step.from_conversation:
                raise LayerFailed("no responses to work on (a step before this one produced none)", [])
            responses = await handler_for(step)(ctx, step, given)
            return responses, list(responses)
        except LayerFailed as exc:
            self.failures.extend(exc.failures)
            ctx.note(f"layer failed ({exc}); previous responses kept")
            if step.from_conversation or not current:
                ctx.record.end_s = self.trace.total_s = self.trace.now()
                causes = "; ".join(self.failures) or str(exc)
                raise PipelineError(f"pipeline {self.pipeline.name!r} failed at step {ctx.index + 1} ({step.kind}): "
                                    f"{exc}. Causes: {causes}") from None
            return (self.produced[step.inputs[0] - 1] or current) if step.inputs else current, []


def _check_conversation(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    validate_messages(messages)
    if messages[-1]["role"] != "user":
        raise InvalidRequest("the conversation must end with a user message")
    return list(messages)


async def iter_run(pipeline: Pipeline, messages: Sequence[ChatMessage], engines: Mapping[str, Engine], *,
                   prices: Prices | None = None, seed: int | None = None, timeout_s: float | None = None,
                   ceiling: Ceiling | None = None, scorers: Mapping[str, Scorer] | None = None,
                   stream_calls: bool = False,
                   code_runner: CodeRunner | None = None) -> AsyncIterator[Event | RunResult]:
    """Run `pipeline` on a conversation: progress events and answer chunks, then the RunResult.

    `ceiling`: the request's token/cost limit; `scorers`: the routers `route` steps name;
    `stream_calls`: every call streams, its text arriving as CallDelta events (to watch the agents);
    `code_runner`: the sandbox `check` steps run code in (None: a pipeline with one is refused).
    """
    if code_runner is None and pipeline.runs_code():
        raise InvalidRequest(f"pipeline {pipeline.name!r} runs model-written code (a check step) and code execution "
                             "is off: start the server with --allow-code-execution (server.code_execution: true in "
                             "models.yaml), or pass --allow-code-execution to moa run")
    state = PipelineRun(pipeline, _check_conversation(messages), engines, prices=prices, seed=seed,
                        timeout_s=timeout_s, ceiling=ceiling, scorers=scorers, stream_calls=stream_calls,
                        code_runner=code_runner)
    async with aclosing(state.events()) as items:
        async for item in items:
            yield item


async def run(pipeline: Pipeline, messages: Sequence[ChatMessage], engines: Mapping[str, Engine], *,
              prices: Prices | None = None, on_event: EventSink | None = None, seed: int | None = None,
              timeout_s: float | None = None, ceiling: Ceiling | None = None,
              scorers: Mapping[str, Scorer] | None = None, code_runner: CodeRunner | None = None) -> RunResult:
    """Run `pipeline` to its answer; `on_event` sees every event `iter_run` yields on the way."""
    async with aclosing(iter_run(pipeline, messages, engines, prices=prices, seed=seed, timeout_s=timeout_s,
                                 ceiling=ceiling, scorers=scorers, code_runner=code_runner)) as items:
        async for item in items:
            if isinstance(item, RunResult):
                return item
            if on_event is not None and inspect.isawaitable(result := on_event(item)):
                await result
    raise PipelineError(f"pipeline {pipeline.name!r} ended without a result")  # unreachable: events() ends so
