"""One engine call as the runner makes it: traced, timed out, costed, streamed, cut at a quorum.

Handlers never touch an engine directly; they ask `EngineCalls.call`, so every call
lands in the trace with its tokens and cost whatever the step, and a failure becomes
a `CallFailed` the fault rules (min_success, fallback) can weigh.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from moa.engine import ChatMessage, Completion, Engine, Generation, InvalidRequest, SamplingParams
from moa.trace import AnswerDelta, CallDelta, CallFinished, CallRecord, CallStarted, Event, Trace

Prices = Mapping[str, tuple[float, float]]  # model -> USD per million (prompt, completion) tokens


@dataclass(frozen=True, slots=True)
class Ceiling:
    """A request's spending limit (`moa.max_total_tokens`, `moa.max_cost_usd`).

    The calls that make the first answer (a first `propose` step, the first call of an
    `adaptive`/`route` step) always go ahead: there must be an answer. Any other call
    whose worst case (its prompt plus n x max_tokens, priced where models.yaml sets
    prices) would take the run past the limit is refused as a failed call, so the fault
    rules keep what exists: an escalation is not made, an optional layer is skipped,
    and the run still answers.
    """

    tokens: int | None = None
    cost_usd: float | None = None

    def __bool__(self) -> bool:
        return self.tokens is not None or self.cost_usd is not None


class CallFailed(Exception):
    """An engine call failed or ran over its timeout; the message names the model and the cause."""

    def __init__(self, model: str, cause: str) -> None:
        super().__init__(f"{model}: {cause}")
        self.model, self.cause = model, cause


@dataclass
class EngineCalls:
    engines: Mapping[str, Engine]
    trace: Trace
    emit: Callable[[Event], None]
    prices: Prices = field(default_factory=dict)
    timeout_s: float | None = None  # the run's default per-call timeout
    ceiling: Ceiling = field(default_factory=Ceiling)
    streamed: list[str] = field(default_factory=list)  # answer text sent as AnswerDelta so far
    # Stream every call and emit its samples' text as CallDelta events (a client watching the agents work).
    stream_calls: bool = False
    _reserved: dict[int, tuple[int, float]] = field(default_factory=dict)  # in-flight calls' worst cases

    def spent(self) -> tuple[int, float]:
        """Tokens and dollars of the finished calls plus the worst case of those in flight."""
        tokens = sum(r.prompt_tokens + r.completion_tokens for r in self.trace.calls)
        cost = sum(r.cost_usd for r in self.trace.calls)
        return (tokens + sum(t for t, _ in self._reserved.values()),
                cost + sum(c for _, c in self._reserved.values()))

    def _worst_case(self, model: str, messages: list[ChatMessage], params: SamplingParams) -> tuple[int, float]:
        prompt = sum(self.count_tokens(model, m["content"]) for m in messages)
        completion = params.n * params.max_tokens
        prompt_price, completion_price = self.prices.get(model, (0.0, 0.0))
        return prompt + completion, (prompt * prompt_price + completion * completion_price) / 1e6

    def _over_ceiling(self, model: str, messages: list[ChatMessage], params: SamplingParams) -> str | None:
        """Why this call may not run (it could pass the ceiling), or None."""
        if not self.ceiling:
            return None
        tokens, cost = self._worst_case(model, messages, params)
        spent_tokens, spent_cost = self.spent()
        limit = self.ceiling
        if limit.tokens is not None and spent_tokens + tokens > limit.tokens:
            return (f"skipped: up to {tokens} more tokens would pass max_total_tokens {limit.tokens} "
                    f"({spent_tokens} spent or reserved)")
        if limit.cost_usd is not None and spent_cost + cost > limit.cost_usd:
            return (f"skipped: up to ${cost:.6f} more would pass max_cost_usd {limit.cost_usd} "
                    f"(${spent_cost:.6f} spent or reserved)")
        return None

    def count_tokens(self, model: str, text: str) -> int:
        """Tokens of `text` in `model`'s tokenizer (reference budgets, re-counting after a quorum cut)."""
        engine = self.engines.get(model)
        return engine.count_tokens(text) if engine is not None else max(1, len(text) // 4)

    def stream_answer(self, text: str) -> None:
        if text:
            self.streamed.append(text)
            self.emit(AnswerDelta(text))

    async def call(self, step: str, layer: int, model: str, messages: list[ChatMessage], params: SamplingParams,
                   **options) -> list[str]:
        """One engine request; returns its completions' texts (options: as for `generation`)."""
        return (await self.generation(step, layer, model, messages, params, **options)).texts

    async def generation(self, step: str, layer: int, model: str, messages: list[ChatMessage],
                         params: SamplingParams, *, timeout_s: float | None = None, stream_answer: bool = False,
                         need: int | None = None, essential: bool = False) -> Generation:
        """One engine request, whole (finish reasons, log-probabilities). With `need`, stop once that many finished.

        `essential`: it makes the run's first answer, so the ceiling never refuses it.
        """
        engine = self.engines.get(model)
        # Later layers first: a call that finishes a request goes ahead of one that starts another
        # (where the engine schedules by priority; lower is sooner, ties in arrival order).
        params = replace(params, priority=-layer)
        record = CallRecord(step, layer, model, params.n, self.trace.now(), temperature=params.temperature,
                            seed=params.seed)
        call = len(self.trace.calls)
        self.trace.calls.append(record)
        self.emit(CallStarted(call, step, layer, model, params.n))
        generation: Generation | None = None
        timeout = timeout_s or self.timeout_s
        try:
            if engine is None:
                record.status, record.error = "error", "no engine for this model (not started)"
                raise CallFailed(model, record.error)
            if not essential and (over := self._over_ceiling(model, messages, params)) is not None:
                record.status, record.error = "skipped", over
                raise CallFailed(model, over)
            if self.ceiling:
                self._reserved[id(record)] = self._worst_case(model, messages, params)
            coro = self._consume(engine, messages, params, record, call, stream_answer, need)
            generation = await (asyncio.wait_for(coro, timeout) if timeout else coro)
        except TimeoutError:
            record.status, record.error = "timeout", f"no answer within {timeout} s (aborted)"
            raise CallFailed(model, record.error) from None
        except asyncio.CancelledError:
            record.status = "aborted"
            raise
        except (InvalidRequest, CallFailed):
            if record.status == "running":  # else already says why (no engine, skipped)
                record.status = "error"
            raise
        except Exception as exc:  # engine errors: recorded, and the fault rules decide
            record.status, record.error = "error", f"{type(exc).__name__}: {exc}"
            raise CallFailed(model, record.error) from exc
        else:
            record.status = "ok"
            record.prompt_tokens = generation.prompt_tokens
            record.completion_tokens = generation.completion_tokens
            record.cached_prompt_tokens = generation.cached_prompt_tokens
            record.draft_tokens = sum(c.draft_tokens for c in generation.completions)
            record.accepted_draft_tokens = sum(c.accepted_draft_tokens for c in generation.completions)
            prompt_price, completion_price = self.prices.get(model, (0.0, 0.0))
            record.cost_usd = (generation.prompt_tokens * prompt_price
                               + generation.completion_tokens * completion_price) / 1e6
            return replace(generation, call=call)
        finally:
            self._reserved.pop(id(record), None)
            record.end_s = self.trace.now()
            self.emit(CallFinished.of(record, call, len(generation.completions) if generation is not None else 0))

    async def _consume(self, engine: Engine, messages: list[ChatMessage], params: SamplingParams,
                       record: CallRecord, call: int, stream_answer: bool, need: int | None) -> Generation:
        started = self.trace.now()
        if not stream_answer and need is None and not self.stream_calls:
            generation = await engine.generate(messages, params)
            record.ttft_s = generation.ttft_s
            return generation
        texts = [""] * params.n
        finished: list[int] = []
        stream = engine.stream(messages, params)
        try:
            async for event in stream:
                if isinstance(event, Generation):
                    return event
                if record.ttft_s is None and event.text:
                    record.ttft_s = self.trace.now() - started
                texts[event.index] += event.text
                if self.stream_calls and (event.text or event.finish_reason):
                    self.emit(CallDelta(call, event.index, event.text, event.finish_reason))
                if stream_answer and event.index == 0:
                    self.stream_answer(event.text)
                if event.finish_reason is not None:
                    finished.append(event.index)
                    if need is not None and len(finished) >= need:
                        break  # quorum: closing the stream aborts the other samples in the engine
        finally:
            await stream.aclose()
        # The request was cut (quorum) before the engine's own counts arrived: count with its tokenizer.
        kept = sorted(finished)
        record.aborted_samples = params.n - len(kept)
        record.note = "quorum reached: the other samples were aborted; tokens re-counted without the template"
        completions = tuple(Completion(j, texts[i], engine.count_tokens(texts[i]), "stop")
                            for j, i in enumerate(kept))
        prompt = sum(engine.count_tokens(m["content"]) for m in messages)
        return Generation(engine.name, completions, prompt_tokens=prompt, cached_prompt_tokens=0,
                          ttft_s=record.ttft_s, total_s=self.trace.now() - started)
