"""Start the engines a run needs, one after another, where the plan puts them; check their answers.

The plan (serving/placement/plan.py) comes first and refuses models that do not fit before
anything loads. On GPUs each engine gets its device set (CUDA_VISIBLE_DEVICES for its
EngineCore) and memory fraction; on a CPU its own cores, weighted by model size.
Sequential start matters: vLLM measures free memory when it starts, and the engine
core inherits the environment at spawn, so starts must not overlap.

Every engine whose model has a float32 known-answer reference is checked right after it
starts (a few prefills and a short greedy decode). A vLLM engine on a CPU whose bf16/fp16
kernels disagree with the reference is restarted in float32, with a warning: right answers
first, speed second. The verdict is recorded per model, CPU and vLLM version
(serving/models/checked_dtype.py), so the next start anywhere goes straight to the dtype that passed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from types import TracebackType

from moa.engine import Engine
from serving.engines import create_engine
from serving.engines.adapter_engine import AdapterEngine
from serving.models.checked_dtype import checked_spec, record
from serving.models.float32_reference import ensure_reference
from serving.models.known_answer import CheckError, CheckResult, check_engine, engine_dtype, verify
from serving.models.registry import ModelSpec, Registry
from serving.models.store import resolve
from serving.placement import plan as planning
from serving.placement.devices import Gpu, plan_cores
from serving.placement.plan import EnginePlacement, Plan, plan_engines

log = logging.getLogger(__name__)


def split_cores(count: int, cores: list[int] | None = None) -> list[str]:
    """Core lists ("0,1", ...) for `count` equally weighted CPU engines (or vLLM servers), disjoint when
    there are as many cores as engines (else `plan_cores` shares the first engine's cores).

    vLLM-CPU binds its worker's OpenMP threads to cores; two engines left on "auto"
    bind to the same cores and slow each other down badly. A lone engine gets every
    core: "auto" keeps one core back for the scheduler, which mostly waits on the
    worker; on 2 cores, binding the worker to both gave SmolLM2 +18% (n=1) and
    +29% (n=4) output tokens/s (scripts/bench_engines.py). The pool itself weights
    the split by model size (serving/placement/plan.py).
    """
    names = [str(i) for i in range(count)]
    split = plan_cores(sorted(cores if cores is not None else os.sched_getaffinity(0)), dict.fromkeys(names, 1.0))
    return [split[n] for n in names]


def fallback_spec(spec: ModelSpec) -> ModelSpec | None:
    """The entry in float32, where that is the remedy for wrong answers: a local vLLM engine on a CPU
    running a 16-bit dtype (vLLM-CPU's bf16 kernels differ by CPU generation; float32 takes none of them)."""
    if spec.backend != "vllm" or spec.engine.dtype == "float32":
        return None
    from serving.engines.vllm_args import auto_dtype_on_cpu
    from serving.placement.machine import on_cpu

    if not on_cpu():
        return None
    if spec.engine.dtype == "auto" and spec.source is not None and \
            auto_dtype_on_cpu(resolve(spec).path, spec.engine.quantization) == "float32":
        return None  # `auto` already runs float32 on this CPU
    return spec.model_copy(update={"engine": spec.engine.model_copy(update={"dtype": "float32"})})


class EnginePool:
    """Owns the engines for a set of models; an async context manager.

    `checks` holds each engine's known-answer result (models with a reference); `verify=False`
    skips the check and the float32 fallback. `up` names the models whose engine has started and been
    checked, in start order: a server answers those while the next engines start (`engines` also holds an
    engine between its start and its verdict, and a replaced one briefly). `on_progress` hears one line per
    engine starting and per engine up.
    """

    def __init__(self, registry: Registry, names: Iterable[str], *, verify: bool = True,
                 gpus: list[Gpu] | None = None, ray_address: str | None = None,
                 on_progress: Callable[[str], None] | None = None) -> None:
        self.registry = registry
        self.specs: list[ModelSpec] = [registry.get(n) for n in registry.engine_names(list(names))]
        self.engines: dict[str, Engine] = {}
        self.checks: dict[str, CheckResult] = {}
        self.up: list[str] = []
        self.starting: str | None = None  # the model whose engine is starting now
        self.on_progress = on_progress or (lambda line: None)
        self.verify = verify
        self.gpus = gpus  # plan for this inventory instead of the machine's own (tests, dry runs)
        self.plan: Plan | None = None
        # Every vLLM engine in a Ray actor on this cluster ("auto", "ray://host:10001"); `moa serve
        # --ray-address` and `moa bench --ray-address` set $MOA_RAY_ADDRESS for every pool they make.
        self.ray_address = planning.ray_address(ray_address)

    async def start(self) -> None:
        # The whole plan first: models that do not fit are refused before anything loads.
        self.plan = plan_engines(self.registry, [s.name for s in self.specs], gpus=self.gpus, ray=self.ray_address)
        try:
            for index, spec in enumerate(self.specs, 1):
                placement = self.plan.engines.get(spec.name, EnginePlacement())
                self.starting, began = spec.name, time.monotonic()
                self.on_progress(f"engine {index} of {len(self.specs)}: starting {spec.name}")
                await self._start_one(spec, cpu_threads_bind=placement.cpu_threads_bind,
                                      gpu_memory_utilization=placement.gpu_memory_utilization,
                                      cuda_visible_devices=placement.cuda_visible_devices,
                                      ray_address=self.ray_address)
                self.up.append(spec.name)
                self._serve_adapters(spec.name)
                check = self.checks.get(spec.name)
                verdict = "" if check is None else f", known-answer check {'passed' if check.ok else 'FAILED'}"
                self.on_progress(f"engine {index} of {len(self.specs)}: {spec.name} up in "
                                 f"{time.monotonic() - began:.0f} s{verdict}")
        except BaseException:
            await self.close()
            raise
        finally:
            self.starting = None

    async def _start_one(self, spec: ModelSpec, **placement) -> None:
        """Start `spec` in the dtype recorded as right on this CPU; check it; on a wrong 16-bit engine restart
        it in float32 and record that, so later starts (any path) go straight to float32."""
        running = checked_spec(spec)
        engine = create_engine(running, **placement)
        await engine.start()
        self.engines[spec.name] = engine
        if not self.verify:
            return
        check = await self._check(running, engine)
        if check is None:
            return
        if check.ok:
            if running is spec:  # a recorded fallback keeps the record of the check that chose it
                record(spec, running.engine.dtype, [check])
            return
        fallback = fallback_spec(running)
        if fallback is None:
            if running is not spec:  # the recorded dtype itself fails now: not a 16-bit kernel problem
                record(spec, None, [check])
            log.warning("%s", check.warning())
            return
        await engine.close()
        del self.engines[spec.name]
        engine = create_engine(fallback, **placement)
        await engine.start()
        self.engines[spec.name] = engine
        retry = await self._check(fallback, engine)
        if retry is None:  # the check could not run the second time (already logged)
            log.warning("%s", check.warning())
            return
        retry.replaced = check
        record(spec, fallback.engine.dtype if retry.ok else None, [check, retry])
        log.warning("%s", retry.warning())

    def _serve_adapters(self, name: str) -> None:
        """Each LoRA adapter of the engine becomes a model of its own (BASE:ADAPTER), up with its base."""
        engine = self.engines[name]
        for adapter in getattr(engine, "adapters", {}):
            view = AdapterEngine(engine, adapter)
            self.engines[view.name] = view
            self.up.append(view.name)

    async def _check(self, spec: ModelSpec, engine: Engine) -> CheckResult | None:
        try:
            result = await verify(spec, engine)
        except Exception as exc:  # a check that cannot run must not stop the engines
            log.warning("model %s: the known-answer check could not run: %s", spec.name, exc)
            return None
        if result is not None:
            self.checks[spec.name] = result
            log.info("model %s (%s): known-answer check %.0f%% of %d decisive tokens", spec.name, result.dtype,
                     100 * result.agreement, result.decisive)
        return result

    async def close(self) -> None:
        self.up.clear()  # first: nothing new is sent to an engine that is closing
        for name, engine in reversed(list(self.engines.items())):
            try:
                await engine.close()
            except Exception:  # keep closing the others: no orphan engine processes
                log.exception("closing engine %s failed", name)
        self.engines.clear()

    def __getitem__(self, name: str) -> Engine:
        return self.engines[name]

    async def __aenter__(self) -> EnginePool:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


async def check_model(registry: Registry, name: str) -> list[CheckResult]:
    """`moa models check NAME`: the configured dtype, and float32 too where that is the fallback.

    The engine starts alone, in the configured dtype whatever was recorded, and without the pool's
    own check and fallback, so the result says what that dtype really does on this machine; the
    verdict is recorded for every later engine start (serving/models/checked_dtype.py).
    """
    spec = registry.get(name)
    if spec.source is None:
        raise CheckError(f"model {name!r} has no local weights (backend {spec.backend}, no source) to make a "
                         "float32 reference from; run the check on the machine that holds them")
    reference = await asyncio.to_thread(ensure_reference, resolve(spec))
    results, tried = [], []
    for candidate in (spec, fallback_spec(spec)):
        if candidate is None:
            break
        tried.append(candidate.engine.dtype)
        engine = create_engine(candidate, cpu_threads_bind=split_cores(1)[0], as_checked=False)
        await engine.start()
        try:
            results.append(await check_engine(engine, reference, dtype=engine_dtype(engine, candidate),
                                              always_answer=True))
        finally:
            await engine.close()
        if results[-1].ok:
            break
    if len(results) > 1:
        results[-1].replaced = results[0]
    record(spec, tried[-1] if results[-1].ok else None, results)  # the dtype as models.yaml spells it
    return results
