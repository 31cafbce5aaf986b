"""Engines around engines: how the benchmark's baselines change *how* calls reach an engine.

Each baseline in `moa bench` is the same pipeline on the same engines with one of
these in between, so the only thing that differs is the calling pattern:

- `SplitN`: an n=k request becomes k separate n=1 requests (seeds seed+i), as
  client-side MoA code and reference scripts issue them (baseline d, and part of b, c).
- `Sequential`: every call waits for the previous one to finish, across all engines
  that share the lock (baseline b: proposers called one after another).
- `Recording`: remembers every call so it can be replayed as one batch (baseline a), or with as many
  calls in flight as the pipeline kept (a′), and measures that number (`InFlight`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from moa.engine import ChatMessage, Delta, Engine, Generation, SamplingParams, StreamEvent


class _Wrapper:
    """Forwards everything it does not change to the wrapped engine."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.stats = inner.stats

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    async def generate(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                       request_id: str | None = None) -> Generation:
        return await self.inner.generate(messages, params, request_id=request_id)

    def stream(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
               request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        return self.inner.stream(messages, params, request_id=request_id)


def _child(params: SamplingParams, i: int) -> SamplingParams:
    return replace(params, n=1, seed=None if params.seed is None else params.seed + i)


def merge(model: str, parts: Sequence[Generation], started: float) -> Generation:
    """k single-sample generations of one prompt as one n=k generation (what the runner expects)."""
    ttfts = [p.ttft_s for p in parts if p.ttft_s is not None]
    return Generation(
        model=model,
        completions=tuple(replace(p.completions[0], index=i) for i, p in enumerate(parts)),  # logprobs kept
        prompt_tokens=sum(p.prompt_tokens for p in parts),  # k prefills were asked for
        cached_prompt_tokens=sum(p.cached_prompt_tokens for p in parts),
        ttft_s=min(ttfts) if ttfts else None,
        total_s=time.perf_counter() - started,
    )


class SplitN(_Wrapper):
    """n=k becomes k concurrent n=1 requests; the k results are merged back into one Generation."""

    async def generate(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                       request_id: str | None = None) -> Generation:
        if params.n == 1:
            return await self.inner.generate(messages, params, request_id=request_id)
        started = time.perf_counter()
        parts = await asyncio.gather(*(self.inner.generate(messages, _child(params, i)) for i in range(params.n)))
        return merge(self.name, parts, started)

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                     request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        if params.n == 1:
            async for event in self.inner.stream(messages, params, request_id=request_id):
                yield event
            return
        started = time.perf_counter()
        queue: asyncio.Queue[tuple[int, StreamEvent | BaseException]] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for event in self.inner.stream(messages, _child(params, i)):
                    queue.put_nowait((i, event))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
                queue.put_nowait((i, exc))

        tasks = [asyncio.create_task(pump(i)) for i in range(params.n)]
        parts: dict[int, Generation] = {}
        try:
            while len(parts) < params.n:
                i, event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Generation):
                    parts[i] = event
                else:
                    yield Delta(i, event.text, event.finish_reason)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        yield merge(self.name, [parts[i] for i in range(params.n)], started)


class Sequential(_Wrapper):
    """One call at a time across every engine sharing `lock`: the reference-script calling pattern."""

    def __init__(self, inner: Engine, lock: asyncio.Lock) -> None:
        super().__init__(inner)
        self.lock = lock

    async def generate(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                       request_id: str | None = None) -> Generation:
        async with self.lock:
            return await self.inner.generate(messages, params, request_id=request_id)

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                     request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        async with self.lock:
            async for event in self.inner.stream(messages, params, request_id=request_id):
                yield event


@dataclass(frozen=True, slots=True)
class RecordedCall:
    model: str
    messages: list[ChatMessage]
    params: SamplingParams


@dataclass
class InFlight:
    """The time-weighted mean number of calls in flight while a level ran (shared by its engines'
    Recordings): a replay that keeps that many in flight asks the engine for the same batch sizes, so
    pipeline ÷ replay separates the orchestration's cost from the batch the layer dependency leaves."""

    now: int = 0
    area: float = 0.0
    first: float | None = None
    last: float = 0.0

    def change(self, delta: int) -> None:
        t = time.perf_counter()
        if self.first is None:
            self.first = self.last = t
        self.area += self.now * (t - self.last)
        self.last, self.now = t, self.now + delta

    @property
    def mean(self) -> float:
        span = self.last - self.first if self.first is not None else 0.0
        return self.area / span if span > 0 else 0.0


class Recording(_Wrapper):
    """Remembers every call (model, messages, params) into a shared list, for replay as one batch,
    and counts the calls in flight."""

    def __init__(self, inner: Engine, calls: list[RecordedCall], in_flight: InFlight | None = None) -> None:
        super().__init__(inner)
        self.calls = calls
        self.in_flight = in_flight or InFlight()

    def _record(self, messages: Sequence[ChatMessage], params: SamplingParams) -> None:
        self.calls.append(RecordedCall(self.name, [dict(m) for m in messages], params))  # type: ignore[misc]

    async def generate(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                       request_id: str | None = None) -> Generation:
        self._record(messages, params)
        self.in_flight.change(+1)
        try:
            return await self.inner.generate(messages, params, request_id=request_id)
        finally:
            self.in_flight.change(-1)

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                     request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        self._record(messages, params)
        self.in_flight.change(+1)
        try:
            async for event in self.inner.stream(messages, params, request_id=request_id):
                yield event
        finally:
            self.in_flight.change(-1)
