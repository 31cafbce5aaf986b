"""Measure requests: one pipeline run (in-process or over HTTP), a concurrency level, a raw batch replay.

A level is closed-loop, like vLLM's benchmark with --max-concurrency: `concurrency`
clients each send their next request as soon as the previous one is answered,
until `requests` have been sent. Every number in the reports comes from the
`RequestSample`s and wall times collected here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from moa.context import CodeRunner
from moa.engine import ChatMessage, Engine, Generation, SamplingParams
from moa.pipeline import Pipeline
from moa.routing import Scorer
from moa.runner import Prices, run
from moa.steps import llm_step_kinds
from moa.trace import AnswerDelta, Event
from serving.bench.baselines import RecordedCall
from serving.bench.stats import mean, percentile


@dataclass(slots=True)
class RequestSample:
    index: int
    start_s: float  # since the level started
    latency_s: float = 0.0
    ttft_s: float | None = None  # first token of the final answer, from the client's side
    first_token_s: float | None = None  # first token of any first-layer call (proposals)
    answer_tokens: int = 0
    completion_tokens: int = 0  # every engine call of the request
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    engine_calls: int = 0
    cost_usd: float = 0.0
    critical_path_s: float | None = None  # the engine calls' own chain (in-process runs, from the trace)
    layers: dict[str, float] = field(default_factory=dict)  # "L1 propose" -> seconds
    # "L2 aggregate" -> [draft tokens proposed, accepted], where the engines speculate (engine.speculative)
    drafts: dict[str, list[int]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)  # "model xn" per engine call, in order (who routing asked)
    notes: list[str] = field(default_factory=list)  # the steps' decisions (routing, escalation, skipped layers)
    answer: str = ""
    answers: list[str] = field(default_factory=list)  # every sample of an n > 1 request (pass@k); answer: the first
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class LevelResult:
    system: str
    pipeline: str
    concurrency: int
    wall_s: float
    samples: list[RequestSample]


RequestFn = Callable[[int, float], Awaitable[RequestSample]]  # (index, level start) -> sample


async def pipeline_request(pipeline: Pipeline, messages: Sequence[ChatMessage], engines: Mapping[str, Engine],
                           index: int, t0: float, *, seed: int | None = None,
                           prices: Prices | None = None, scorers: Mapping[str, Scorer] | None = None,
                           code_runner: CodeRunner | None = None) -> RequestSample:
    """Run the pipeline once in-process; TTFT is the first streamed chunk of the final answer."""
    started = time.perf_counter()
    sample = RequestSample(index, started - t0)
    first: list[float] = []

    def on_event(event: Event) -> None:
        if isinstance(event, AnswerDelta) and event.text and not first:
            first.append(time.perf_counter() - started)

    try:
        result = await run(pipeline, messages, engines, prices=prices, on_event=on_event, seed=seed, scorers=scorers,
                           code_runner=code_runner)
    except Exception as exc:  # a failed request is counted, not fatal: the level goes on
        sample.latency_s = time.perf_counter() - started
        sample.error = f"{type(exc).__name__}: {exc}"
        return sample
    sample.latency_s = time.perf_counter() - started
    sample.ttft_s = first[0] if first else sample.latency_s  # a transform last (vote): nothing streams
    usage = result.usage
    sample.completion_tokens = usage.completion_tokens
    sample.prompt_tokens = usage.prompt_tokens
    sample.cached_prompt_tokens = usage.cached_prompt_tokens
    sample.engine_calls = usage.engine_calls
    sample.cost_usd = usage.cost_usd
    sample.critical_path_s = result.trace.critical_path_s() or None
    firsts = [c.start_s + c.ttft_s for c in result.trace.calls if c.layer == 1 and c.ttft_s is not None]
    sample.first_token_s = min(firsts) if firsts else None
    final = [c for c in result.trace.calls if c.status == "ok"]
    if final:
        sample.answer_tokens = final[-1].completion_tokens // max(1, final[-1].n)
    llm_kinds = llm_step_kinds()
    for step in result.trace.steps:
        if step.end_s is not None and step.step in llm_kinds:
            sample.layers[f"L{step.layer} {step.step}"] = step.end_s - step.start_s
    for call in result.trace.calls:
        if call.draft_tokens:
            counts = sample.drafts.setdefault(f"L{call.layer} {call.step}", [0, 0])
            counts[0] += call.draft_tokens
            counts[1] += call.accepted_draft_tokens
    sample.calls = [f"{c.model} x{c.n}" for c in result.trace.calls if c.status != "skipped"]
    sample.notes = [note for step in result.trace.steps for note in step.notes]
    sample.answer = result.answer
    return sample


async def generation_request(engine: Engine, messages: Sequence[ChatMessage], params: SamplingParams, index: int,
                             t0: float) -> RequestSample:
    """One engine request for params.n samples of one model (`moa eval --samples`): one prefill, n answers."""
    started = time.perf_counter()
    sample = RequestSample(index, started - t0)
    try:
        generation = await engine.generate(messages, params)
    except Exception as exc:  # counted, not fatal, as in pipeline_request
        sample.latency_s = time.perf_counter() - started
        sample.error = f"{type(exc).__name__}: {exc}"
        return sample
    sample.latency_s = time.perf_counter() - started
    sample.ttft_s = generation.ttft_s
    sample.completion_tokens = generation.completion_tokens
    sample.prompt_tokens = generation.prompt_tokens
    sample.cached_prompt_tokens = generation.cached_prompt_tokens
    sample.engine_calls = 1
    sample.answer_tokens = generation.completion_tokens // max(1, params.n)
    sample.calls = [f"{generation.model} x{params.n}"]
    sample.answers = generation.texts
    sample.answer = generation.texts[0] if generation.texts else ""
    return sample


async def run_level(system: str, pipeline: str, request: RequestFn, *, concurrency: int, requests: int,
                    on_done: Callable[[RequestSample], None] | None = None) -> LevelResult:
    """`concurrency` closed-loop clients share `requests` requests."""
    indexes = iter(range(requests))
    samples: list[RequestSample] = []
    t0 = time.perf_counter()

    async def client() -> None:
        for i in indexes:  # a shared iterator: each request is taken by exactly one client
            sample = await request(i, t0)
            samples.append(sample)
            if on_done is not None:
                on_done(sample)

    await asyncio.gather(*(client() for _ in range(min(concurrency, requests))))
    wall = time.perf_counter() - t0
    return LevelResult(system, pipeline, concurrency, wall, sorted(samples, key=lambda s: s.index))


@dataclass(slots=True)
class ReplayResult:
    calls: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    in_flight: int | None = None  # None: all at once

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0


async def replay(calls: Sequence[RecordedCall], engines: Mapping[str, Engine], *,
                 in_flight: int | None = None) -> ReplayResult:
    """Submit the very same generation calls to the engines: all at once (the engine's own limit), or in
    their recorded order keeping `in_flight` of them running (the batch the pipeline gave the engine)."""
    gate = asyncio.Semaphore(in_flight or len(calls) or 1)

    async def one(call: RecordedCall) -> Generation:
        async with gate:
            return await engines[call.model].generate(call.messages, call.params)

    t0 = time.perf_counter()
    generations = await asyncio.gather(*(one(c) for c in calls))
    wall = time.perf_counter() - t0
    return ReplayResult(len(calls), sum(g.prompt_tokens for g in generations),
                        sum(g.completion_tokens for g in generations), wall, in_flight)


def summarize(level: LevelResult) -> dict:
    """vLLM-style serving metrics plus MoA ones, for one system at one concurrency level."""
    ok = [s for s in level.samples if s.ok]
    wall = level.wall_s or float("nan")
    latencies = [s.latency_s for s in ok]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    firsts = [s.first_token_s for s in ok if s.first_token_s is not None]
    tpots = [(s.latency_s - s.ttft_s) / (s.answer_tokens - 1) for s in ok
             if s.ttft_s is not None and s.answer_tokens > 1 and s.latency_s > s.ttft_s]
    layer_names = list(dict.fromkeys(name for s in ok for name in s.layers))
    per_request = (lambda attr: mean([getattr(s, attr) for s in ok]))  # noqa: E731
    return {
        "system": level.system,
        "pipeline": level.pipeline,
        "concurrency": level.concurrency,
        "requests": len(level.samples),
        "errors": len(level.samples) - len(ok),
        "first_error": next((s.error for s in level.samples if s.error), None),
        "wall_s": level.wall_s,
        "request_throughput": len(ok) / wall,
        "answer_tokens_per_s": sum(s.answer_tokens for s in ok) / wall,
        "output_tokens_per_s": sum(s.completion_tokens for s in ok) / wall,
        "ttft_s": {f"p{q}": percentile(ttfts, q) for q in (50, 90, 99)} | {"mean": mean(ttfts)},
        "proposal_ttft_s": {"p50": percentile(firsts, 50), "mean": mean(firsts)},
        "tpot_s": {"p50": percentile(tpots, 50), "mean": mean(tpots)},
        "latency_s": {f"p{q}": percentile(latencies, q) for q in (50, 90, 99)} | {"mean": mean(latencies)},
        "per_request": {
            "engine_calls": per_request("engine_calls"),
            "prompt_tokens": per_request("prompt_tokens"),
            "cached_prompt_tokens": per_request("cached_prompt_tokens"),
            "completion_tokens": per_request("completion_tokens"),
            "answer_tokens": per_request("answer_tokens"),
            "cost_usd": per_request("cost_usd"),
        },
        # One request's latency over its critical path (Trace.critical_path_s): 1.0 is no orchestration overhead.
        "critical_path_ratio": mean([s.latency_s / s.critical_path_s for s in ok if s.critical_path_s]),
        "layer_latency_s": {name: mean([s.layers[name] for s in ok if name in s.layers]) for name in layer_names},
        # Per layer, the share of the engines' draft tokens accepted (speculative decoding; absent without it).
        "draft_acceptance": _acceptance(ok),
    }


def _acceptance(samples: Sequence[RequestSample]) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for sample in samples:
        for name, (drafted, accepted) in sample.drafts.items():
            counts = totals.setdefault(name, [0, 0])
            counts[0] += drafted
            counts[1] += accepted
    return {name: accepted / drafted for name, (drafted, accepted) in totals.items() if drafted}
