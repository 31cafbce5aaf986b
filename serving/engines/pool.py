"""Start the engines a run needs, one after another, and close every one of them.

Sequential start matters: vLLM measures free memory when it starts, so two
engines starting at once on one GPU both see the whole device. On a CPU the pool
gives each local vLLM engine its own cores, so two engines do not fight over one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from types import TracebackType

from moa.engine import Engine
from serving.engines import create_engine
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


class EnginePool:
    """Owns the engines for a set of models; an async context manager."""

    def __init__(self, registry: Registry, names: Iterable[str]) -> None:
        self.specs: list[ModelSpec] = [registry.get(n) for n in dict.fromkeys(names)]
        self.engines: dict[str, Engine] = {}

    async def start(self) -> None:
        local_vllm = [s for s in self.specs if s.backend == "vllm"]
        # An explicit VLLM_CPU_OMP_THREADS_BIND from the user wins over ours.
        binds = {} if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") else dict(
            zip((s.name for s in local_vllm), split_cores(len(local_vllm)), strict=True))
        gpu_share = round(0.9 / len(local_vllm), 3) if local_vllm else None
        try:
            for spec in self.specs:
                engine = create_engine(spec, cpu_threads_bind=binds.get(spec.name), gpu_memory_utilization=gpu_share)
                await engine.start()
                self.engines[spec.name] = engine
        except BaseException:
            await self.close()
            raise

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
