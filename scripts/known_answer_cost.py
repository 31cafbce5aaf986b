"""What the known-answer check costs at an engine start, split into its teacher-forced and decode halves.

    .venv/bin/python scripts/known_answer_cost.py qwen2.5-coder-1.5b [--dtype float32] [--runs 2]

Starts the model's engine alone (without the pool's own check), then times the two halves of
serving/models/known_answer.py's check against the stored float32 reference, and the whole check.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time


async def main(name: str, dtype: str | None, runs: int) -> None:
    from serving.engines.pool import EnginePool
    from serving.models.float32_reference import load_reference
    from serving.models.known_answer import check_engine, compare, decode_case
    from serving.models.registry import load_registry
    from serving.models.store import resolve

    registry = load_registry()
    if dtype:
        spec = registry.models[name]
        registry.models[name] = spec.model_copy(update={"engine": spec.engine.model_copy(update={"dtype": dtype})})
    reference = load_reference(resolve(registry.get(name)))
    if reference is None:
        raise SystemExit(f"no float32 reference for {name}: run `moa models check {name}` once")
    async with EnginePool(registry, [name], verify=False) as pool:
        engine = pool[name]
        for _ in range(runs):
            started = time.perf_counter()
            cases = [compare(c, await engine.top1_tokens(c.prompt_ids + c.tokens, len(c.prompt_ids)))
                     for c in reference.cases]
            forced = time.perf_counter()
            await asyncio.gather(*(decode_case(engine, c, r) for c, r in zip(reference.cases, cases, strict=True)))
            done = time.perf_counter()
            print(f"{name} ({engine.dtype}): teacher-forced {forced - started:.2f} s, decode {done - forced:.2f} s, "
                  f"re-anchors {[r.decode_reanchors for r in cases]}", flush=True)
        result = await check_engine(engine, reference, dtype=engine.dtype)
        print(f"{name} ({engine.dtype}): whole check {result.seconds:.2f} s, ok={result.ok}, "
              f"agreement {result.agreement:.0%} forced / {result.decode_agreement:.0%} decoded")


if __name__ == "__main__":
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--dtype", help="run this dtype instead of the configured one")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.model, args.dtype, args.runs))
