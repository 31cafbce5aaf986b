"""`moa bench` in-process: every system on the same engines, prompts and sampling, one after another.

Systems (the names used in tables and JSON):
- `moa`: the pipeline as moa-stack runs it (in-process engines, concurrent calls, n=k requests);
- `raw` (baseline a): the calls `moa` made at the highest concurrency, replayed at once as one batch;
- `split-n` (baseline d): `moa` with every n=k request sent as k separate requests (Self-MoA pipelines);
- `sequential` (baseline b): one request at a time, its calls one after another, n=1 each;
- `http` (baseline c): each call a separate HTTP request to a vLLM OpenAI server per model, gathered
  concurrently, n=1 each (client-side MoA libraries).
Every run starts with cold prefix caches, so the order of systems does not favour any of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from moa.engine import ChatMessage, Engine, SamplingParams
from moa.pipeline import Pipeline
from moa.steps import Propose
from serving.bench.baselines import InFlight, RecordedCall, Recording, Sequential, SplitN
from serving.bench.measure import LevelResult, ReplayResult, RequestSample, pipeline_request, replay, run_level
from serving.models.registry import Registry

SYSTEMS = ("moa", "raw", "split-n", "sequential", "http")
WARMUP: list[ChatMessage] = [{"role": "user", "content": "Say hello."}]


@dataclass
class BenchPlan:
    pipelines: list[Pipeline]
    prompts: list[list[ChatMessage]]
    concurrency: list[int]
    requests: int | None  # per level; None: level_requests' steady-state default
    sequential_requests: int
    systems: set[str]
    seed: int | None
    log_dir: Path


# The targets are judged at a steady state: every client sends at least this many requests, so the first round
# (all clients starting together, a batch no later round sees) is at most a third of the samples.
STEADY_REQUESTS_PER_CLIENT = 3


def level_requests(requests: int | None, concurrency: int) -> int:
    """Requests at one level: as asked, else a steady state (3 per client, at least 16)."""
    return requests or max(16, STEADY_REQUESTS_PER_CLIENT * concurrency)


def is_steady(requests: int, concurrency: int) -> bool:
    return requests >= STEADY_REQUESTS_PER_CLIENT * concurrency


@dataclass
class PipelineBench:
    pipeline: Pipeline
    levels: list[LevelResult] = field(default_factory=list)
    raw: ReplayResult | None = None
    # The same calls with as many in flight as the pipeline kept at the top level (its time-weighted mean).
    raw_same_in_flight: ReplayResult | None = None
    in_flight: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # system -> why it did not run


Progress = Callable[[str, int], Callable[[RequestSample], None]]  # (label, total) -> per-request callback


def samples_in_one_request(pipeline: Pipeline) -> bool:
    """True when some Propose sends one model k > 1 times: what Self-MoA's n=k batching is about."""
    return any(isinstance(s, Propose) and (s.samples > 1 or len(s.models) > len(set(s.models)))
               for s in pipeline.steps)


def sequential_engines(engines: Mapping[str, Engine]) -> dict[str, Engine]:
    """Baseline (b): n=k split into k requests first, then one call at a time across all engines."""
    lock = asyncio.Lock()
    return {name: SplitN(Sequential(engine, lock)) for name, engine in engines.items()}


async def reset_caches(engines: Mapping[str, Engine]) -> None:
    for engine in engines.values():
        reset = getattr(engine, "reset_prefix_cache", None)
        if reset is not None:
            await reset()


async def warm_up(engines: Mapping[str, Engine]) -> None:
    """One short request per engine: first-request allocations stay out of the measurements."""
    await asyncio.gather(*(e.generate(WARMUP, SamplingParams(temperature=0, max_tokens=8)) for e in engines.values()))


class Bench:
    def __init__(self, registry: Registry, plan: BenchPlan, progress: Progress) -> None:
        self.registry = registry
        self.plan = plan
        self.progress = progress
        self.prices = registry.prices()
        self.scorers = registry.scorers()

    async def level(self, system: str, pipeline: Pipeline, engines: Mapping[str, Engine], concurrency: int,
                    requests: int) -> LevelResult:
        prompts = self.plan.prompts
        seed = self.plan.seed

        async def request(i: int, t0: float) -> RequestSample:
            return await pipeline_request(pipeline, prompts[i % len(prompts)], engines, i, t0,
                                          seed=None if seed is None else seed + 1000 * i, prices=self.prices,
                                          scorers=self.scorers)

        on_done = self.progress(f"{pipeline.name} · {system} · c={concurrency}", requests)
        return await run_level(system, pipeline.name, request, concurrency=concurrency, requests=requests,
                               on_done=on_done)

    async def in_process(self, pipeline: Pipeline, out: PipelineBench) -> None:
        from serving.engines.pool import EnginePool

        systems = self.plan.systems
        async with EnginePool(self.registry, pipeline.models()) as pool:
            engines = pool.engines
            await warm_up(engines)
            recorded: list[RecordedCall] = []
            in_flight = InFlight()
            top = max(self.plan.concurrency)
            if systems & {"moa", "raw"}:
                for c in self.plan.concurrency:
                    await reset_caches(engines)
                    used = ({n: Recording(e, recorded, in_flight) for n, e in engines.items()} if c == top
                            else engines)
                    out.levels.append(await self.level("moa", pipeline, used, c, level_requests(self.plan.requests, c)))
                out.in_flight = in_flight.mean
            if "raw" in systems:
                await reset_caches(engines)
                self.progress(f"{pipeline.name} · raw batch of {len(recorded)} calls", 0)
                out.raw = await replay(recorded, engines)
                same = max(1, round(in_flight.mean))
                await reset_caches(engines)
                self.progress(f"{pipeline.name} · the same calls, {same} in flight", 0)
                out.raw_same_in_flight = await replay(recorded, engines, in_flight=same)
            if "split-n" in systems:
                if samples_in_one_request(pipeline):
                    split = {n: SplitN(e) for n, e in engines.items()}
                    for c in self.plan.concurrency:
                        await reset_caches(engines)
                        out.levels.append(await self.level("split-n", pipeline, split, c,
                                                           level_requests(self.plan.requests, c)))
                else:
                    out.skipped["split-n"] = "no step sends one model k > 1 times"
            if "sequential" in systems:
                await reset_caches(engines)
                serial = sequential_engines(engines)
                out.levels.append(await self.level("sequential", pipeline, serial, 1, self.plan.sequential_requests))

    async def over_http(self, pipeline: Pipeline, out: PipelineBench) -> None:
        from serving.engines.openai_engine import OpenAIEngine
        from serving.engines.pool import split_cores
        from serving.engines.vllm_server import VLLMServer

        specs = [self.registry.get(n) for n in self.registry.engine_names(list(pipeline.models()))]
        not_local = [s.name for s in specs if s.backend != "vllm"]
        if not_local:
            out.skipped["http"] = f"needs local vLLM models; {', '.join(not_local)} are not"
            return
        if with_adapters := [s.name for s in specs if s.adapters]:
            out.skipped["http"] = f"LoRA adapters are served in-process only; {', '.join(with_adapters)} has them"
            return
        servers = [VLLMServer(spec, self.plan.log_dir / f"vllm-server-{spec.name}.log", cpu_threads_bind=bind)
                   for spec, bind in zip(specs, split_cores(len(specs)), strict=True)]
        engines: dict[str, Engine] = {}
        try:
            for server in servers:  # one after another, as the in-process pool starts them
                self.progress(f"{pipeline.name} · starting vLLM server for {server.spec.name}", 0)
                await asyncio.to_thread(server.start)
            for server in servers:
                engine = OpenAIEngine(server.openai_spec())
                await engine.start()
                engines[server.spec.name] = engine
            await warm_up(engines)
            fan_out = {n: SplitN(e) for n, e in engines.items()}
            for c in self.plan.concurrency:
                await asyncio.gather(*(asyncio.to_thread(s.reset_prefix_cache) for s in servers))
                out.levels.append(await self.level("http", pipeline, fan_out, c, level_requests(self.plan.requests, c)))
        finally:
            for engine in engines.values():
                await engine.close()
            for server in servers:
                await asyncio.to_thread(server.stop)

    async def run(self) -> list[PipelineBench]:
        results = []
        for pipeline in self.plan.pipelines:
            out = PipelineBench(pipeline)
            if self.plan.systems & {"moa", "raw", "split-n", "sequential"}:
                await self.in_process(pipeline, out)
            if "http" in self.plan.systems:
                await self.over_http(pipeline, out)
            results.append(out)
        return results


def parse_levels(text: str) -> list[int]:
    """"1,4,16" -> [1, 4, 16], sorted and unique, each >= 1."""
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--concurrency expects numbers separated by commas, e.g. 1,4,16; got {text!r}") from None
    if not levels or levels[0] < 1:
        raise ValueError(f"--concurrency levels must be >= 1, got {text!r}")
    return levels



