"""One engine's time per decode step by batch size, and its prefill rate: where batching stops paying.

    .venv/bin/python scripts/bench_batch_curve.py [--model qwen2.5-coder-0.5b] [--compile]

B requests of 64 tokens each (ignore_eos, temperature 0.7) are submitted at once; the step time is the
wall time after the last first token, over 63 steps. Prefill: 8 prompts of L tokens, max_tokens 1.
The engine gets the models.yaml arguments and every core, as a lone engine does in the pool.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving.engines.pool import split_cores  # noqa: E402
from serving.engines.vllm_args import build_engine_args  # noqa: E402
from serving.models.registry import load_registry  # noqa: E402
from serving.models.store import resolve  # noqa: E402

BATCHES = (1, 4, 8, 16, 24, 32, 48, 64)
PREFILL_LENGTHS = (32, 64, 128, 256, 512)


async def main(model: str, compile: bool) -> None:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    spec = load_registry().get(model)
    kwargs = build_engine_args(spec, resolve(spec).path) | {"disable_log_stats": True}
    if compile:
        kwargs["enforce_eager"] = False
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = split_cores(1)[0]
    started = time.perf_counter()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    print(f"{model} ({'compiled' if compile else 'eager'}): started in {time.perf_counter() - started:.1f} s")
    ids = iter(range(10**9))

    async def one(prompt, params) -> tuple[float, float]:
        t, first = time.perf_counter(), None
        async for _ in llm.generate(prompt, params, f"curve-{next(ids)}"):
            first = first or time.perf_counter() - t
        return first or 0.0, time.perf_counter() - t

    await one("warm up", SamplingParams(max_tokens=4))
    decode = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.7)
    print("| batch | step ms | decode tok/s |\n|---|---|---|")
    for batch in BATCHES:
        t = time.perf_counter()
        results = await asyncio.gather(*[one(f"Question {i}: explain item {i * 7} in detail.", decode)
                                         for i in range(batch)])
        decoding = time.perf_counter() - t - max(first for first, _ in results)
        print(f"| {batch} | {1000 * decoding / 63:.1f} | {batch * 63 / decoding:.1f} |", flush=True)
    print("\n| prefill | tok/s |\n|---|---|")
    for length in PREFILL_LENGTHS:
        t = time.perf_counter()
        await asyncio.gather(*[one({"prompt_token_ids": [100 + (i * 31 + j) % 5000 for j in range(length)]},
                                   SamplingParams(max_tokens=1)) for i in range(8)])
        print(f"| 8 x {length} tokens | {8 * length / (time.perf_counter() - t):.0f} |", flush=True)
    llm.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--compile", action="store_true", help="enforce_eager: false (torch.compile)")
    args = parser.parse_args()
    asyncio.run(main(args.model, args.compile))
