"""k agents three ways, in one run: k LoRA adapters on one engine, k requests to the base alone, k engines.

    .venv/bin/python scripts/bench_lora.py [--clients 1 4 8] [--max-tokens 64] [--json out.json]

- `adapters`: smollm2-135m-lora, its three adapters (scripts/train_adapters.py) round-robin, one engine.
- `base`: the same requests to the base model on an engine without LoRA (the LoRA overhead is the difference).
- `engines`: three engines of the base, one per agent (what k fine-tuned full copies would cost), requests
  round-robin; on a CPU they share its cores.

Every request generates exactly --max-tokens (vLLM's ignore_eos: the adapters learned short replies, and a fair
throughput compares equal work). Clients run closed loops; each level sends 3 x clients x --rounds requests.
Memory is the peak PSS of the engine processes (shared pages counted once), sampled every 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_engines import PROMPTS, MemorySampler  # noqa: E402

BASE, LORA = "smollm2-135m", "smollm2-135m-lora"
ADAPTERS = ("french", "pirate", "tagged")


async def load(targets: list[tuple], clients: int, rounds: int, max_tokens: int) -> dict:
    """`targets`: (engine, lora_request) per agent; requests go round-robin over them."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.7, ignore_eos=True, seed=0)
    latencies: list[float] = []
    tokens = 0
    counter = iter(range(10**9))

    async def client(c: int) -> None:
        nonlocal tokens
        for _ in range(rounds * len(targets)):
            i = next(counter)
            engine, lora = targets[i % len(targets)]
            prompt = [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (request {i})"}]
            ids = engine.prompt_token_ids(prompt)
            started = time.perf_counter()
            final = None
            source = engine._llm.renderer.render_cmpl([{"prompt_token_ids": ids}])[0]
            async for out in engine._llm.generate(source, params, f"bench-{i}", lora_request=lora):
                final = out
            latencies.append(time.perf_counter() - started)
            tokens += len(final.outputs[0].token_ids)

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "output_tok_s": round(tokens / wall, 1),
            "p50_s": round(statistics.median(latencies), 2),
            "p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 2), "wall_s": round(wall, 1)}


async def configuration(kind: str, registry, clients: list[int], rounds: int, max_tokens: int) -> dict:
    from serving.engines.pool import split_cores
    from serving.engines.vllm_engine import VLLMEngine
    from serving.models.checked_dtype import checked_spec
    from serving.models.store import resolve

    if kind == "engines":
        specs = [registry.get(BASE).model_copy(update={"name": f"{BASE}-{a}"}) for a in ADAPTERS]
    else:
        specs = [registry.get(LORA if kind == "adapters" else BASE)]
    binds = split_cores(len(specs))
    with MemorySampler() as memory:
        started = time.perf_counter()
        engines = [VLLMEngine(checked_spec(s), resolve(s), cpu_threads_bind=b)
                   for s, b in zip(specs, binds, strict=True)]
        for engine in engines:
            await engine.start()
        start_s = time.perf_counter() - started
        if kind == "adapters":
            targets = [(engines[0], engines[0].lora_request(a)) for a in ADAPTERS]
        elif kind == "base":
            targets = [(engines[0], None)] * len(ADAPTERS)
        else:
            targets = [(e, None) for e in engines]
        levels = []
        for n in clients:
            await asyncio.gather(*(e.reset_prefix_cache() for e in engines))
            levels.append(await load(targets, n, rounds, max_tokens))
            print(kind, levels[-1], flush=True)
        for engine in engines:
            await engine.close()
    return {"kind": kind, "engines": len(engines), "dtype": engines[0].dtype, "start_s": round(start_s, 1),
            "peak_engine_pss_gib": round(memory.peak_children / 2**30, 2), "levels": levels}


async def main() -> None:
    from serving.models.registry import load_registry
    from serving.placement.machine import cpu_summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per agent at each level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--only", nargs="+", choices=["adapters", "base", "engines"],
                        default=["adapters", "base", "engines"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    registry = load_registry()
    results = {"cpu": cpu_summary(), "max_tokens": args.max_tokens, "configurations": []}
    for kind in args.only:
        results["configurations"].append(await configuration(kind, registry, args.clients, args.rounds,
                                                              args.max_tokens))
    print(f"\n{results['cpu']}; {args.max_tokens} tokens per request (ignore_eos)")
    print("| configuration | engines | dtype | start | peak PSS | " +
          " | ".join(f"{n} clients tok/s (p50 / p90 s)" for n in args.clients) + " |")
    print("|---" * (5 + len(args.clients)) + "|")
    for c in results["configurations"]:
        cells = [f"{lv['output_tok_s']} ({lv['p50_s']} / {lv['p90_s']})" for lv in c["levels"]]
        print(f"| {c['kind']} | {c['engines']} | {c['dtype']} | {c['start_s']} s | {c['peak_engine_pss_gib']} GiB | "
              + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
