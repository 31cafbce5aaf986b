"""Per-call overhead: one in-process vLLM engine call versus the same call over HTTP to a vLLM server,
and (with --ray) through a Ray actor holding the same engine.

    .venv/bin/python scripts/bench_call_overhead.py [--model smollm2-135m] [--calls 40] [--ray]

Every side has the same engine arguments and cores; requests ask for max_tokens=1 so the
difference is what a call costs outside the model (HTTP, JSON, the API server's own
tokenisation and detokenisation; or Ray's task submission and streaming generator). This is what
`moa bench`'s `http` baseline, and `moa bench --ray-address`, pay per call.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from moa.engine import SamplingParams

Q = [{"role": "user", "content": "What is the capital of France?"}]


async def timed(engine, calls: int, concurrent: int) -> tuple[float, float]:
    """p50 latency of sequential calls (ms), and wall time of `concurrent` calls at once (ms)."""
    params = SamplingParams(temperature=0.0, max_tokens=1)
    await engine.generate(Q, params)  # warm up
    latencies = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await engine.generate(Q, params)
        latencies.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    await asyncio.gather(*(engine.generate(Q, params) for _ in range(concurrent)))
    return statistics.median(latencies), (time.perf_counter() - t0) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--ray", action="store_true", help="Also through a Ray actor (a local Ray instance).")
    args = parser.parse_args()

    from serving.engines.openai_engine import OpenAIEngine
    from serving.engines.pool import EnginePool, split_cores
    from serving.engines.vllm_server import VLLMServer
    from serving.models.registry import load_registry

    registry = load_registry()
    async with EnginePool(registry, [args.model]) as pool:
        local = await timed(pool[args.model], args.calls, args.concurrent)
    with VLLMServer(registry.get(args.model), Path(tempfile.mkdtemp()) / "server.log",
                    cpu_threads_bind=split_cores(1)[0]) as server:  # the cores the pool gave the engine
        engine = OpenAIEngine(server.openai_spec())
        await engine.start()
        try:
            remote = await timed(engine, args.calls, args.concurrent)
        finally:
            await engine.close()
    print(f"{args.model}, max_tokens=1: in-process p50 {local[0]:.1f} ms, {args.concurrent} at once "
          f"{local[1]:.0f} ms; over HTTP p50 {remote[0]:.1f} ms, {args.concurrent} at once {remote[1]:.0f} ms; "
          f"overhead per call {remote[0] - local[0]:.1f} ms")
    if args.ray:
        import ray

        ray.init(num_cpus=len(split_cores(1)[0].split(",")), logging_level="WARNING", log_to_driver=False)
        try:
            async with EnginePool(registry, [args.model], ray_address="auto") as pool:
                in_ray = await timed(pool[args.model], args.calls, args.concurrent)
        finally:
            ray.shutdown()
        print(f"{args.model}, max_tokens=1: through a Ray actor p50 {in_ray[0]:.1f} ms, {args.concurrent} at once "
              f"{in_ray[1]:.0f} ms; overhead per call {in_ray[0] - local[0]:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
