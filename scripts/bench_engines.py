"""Raw engine figures: start time, output tokens/s with n=1 and n=4 over 8 prompts, peak memory.

    .venv/bin/python scripts/bench_engines.py [MODEL ...] [--max-tokens 128] [--json out.json]

Each model's engine is started alone (one at a time), the 8 prompts are submitted
concurrently (one batch), and the process tree's memory (PSS, so shared pages are
not counted twice) is sampled every 100 ms. `moa bench` (pipelines) builds on this.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "Explain in a short paragraph why the sky is blue.",
    "Write a Python function that checks whether a string is a palindrome.",
    "List three differences between TCP and UDP.",
    "A train leaves at 9:40 and arrives at 11:15. How long is the trip? Explain.",
    "Summarise the plot of Romeo and Juliet in four sentences.",
    "What is a hash map, and when would you use one instead of a list?",
    "Give two tips for writing clear commit messages.",
    "Translate 'Where is the railway station?' into French and Spanish.",
]


class MemorySampler:
    """Peak PSS of this process and of its child processes (the engine core and workers)."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self._me = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak_children = 0
        self.peak_total = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pss(self, proc) -> int:
        try:
            return proc.memory_full_info().pss
        except Exception:  # a process that just exited
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            children = sum(self._pss(p) for p in self._me.children(recursive=True))
            self.peak_children = max(self.peak_children, children)
            self.peak_total = max(self.peak_total, children + self._pss(self._me))
            self._stop.wait(self._interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def measure(name: str, max_tokens: int, registry) -> dict:
    from moa.engine import SamplingParams
    from serving.engines.pool import EnginePool
    from serving.models.pull import pull

    pull(registry.get(name))
    result: dict = {"model": name, "prompts": len(PROMPTS), "max_tokens": max_tokens}
    with MemorySampler() as memory:
        started = time.perf_counter()
        pool = EnginePool(registry, [name])
        await pool.start()
        result["start_s"] = round(time.perf_counter() - started, 1)
        engine = pool[name]
        try:
            # Warm-up, so the first measured batch does not pay one-off costs.
            await engine.generate([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=8))
            for n in (1, 4):
                params = SamplingParams(n=n, temperature=0.8, top_p=0.95, max_tokens=max_tokens, seed=0)
                t0 = time.perf_counter()
                outs = await asyncio.gather(*[
                    engine.generate([{"role": "user", "content": p}], params) for p in PROMPTS
                ])
                wall = time.perf_counter() - t0
                tokens = sum(o.completion_tokens for o in outs)
                ttfts = sorted(o.ttft_s for o in outs if o.ttft_s is not None)
                result[f"n{n}"] = {
                    "completions": sum(len(o.completions) for o in outs),
                    "output_tokens": tokens,
                    "wall_s": round(wall, 2),
                    "output_tok_s": round(tokens / wall, 1),
                    "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3),
                }
        finally:
            await pool.close()
    result["peak_engine_pss_gib"] = round(memory.peak_children / 2**30, 2)
    result["peak_total_pss_gib"] = round(memory.peak_total / 2**30, 2)
    return result


async def compare_nk(name: str, k: int, max_tokens: int, registry) -> dict:
    """Self-MoA's proposal step two ways: one request with n=k versus k concurrent n=1 requests.

    Same prompt, same seeds (sample i is seeded i either way), so the same work is asked for.
    """
    from moa.engine import SamplingParams
    from serving.engines.pool import EnginePool

    def prompt(session: int) -> list:  # a fresh prefix each round: no KV cache carried between rounds
        return [{"role": "system", "content": f"Session {session}. " + "You are a careful assistant. " * 40},
                {"role": "user", "content": PROMPTS[3]}]

    out: dict = {"model": name, "k": k, "max_tokens": max_tokens}
    async with EnginePool(registry, [name]) as pool:
        engine = pool[name]
        await engine.generate([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=8))
        # Twice each, interleaved; the second round of each is reported.
        for session, label in enumerate(("n=k", "k separate", "n=k", "k separate")):
            t0 = time.perf_counter()
            if label == "n=k":
                gens = [await engine.generate(prompt(session), SamplingParams(
                    n=k, temperature=0.8, max_tokens=max_tokens, seed=1000))]
            else:
                gens = await asyncio.gather(*[engine.generate(prompt(session), SamplingParams(
                    temperature=0.8, max_tokens=max_tokens, seed=1000 + i)) for i in range(k)])
            wall = time.perf_counter() - t0
            tokens = sum(g.completion_tokens for g in gens)
            out[label] = {"wall_s": round(wall, 2), "output_tok_s": round(tokens / wall, 1),
                          "ttft_s": round(min(g.ttft_s for g in gens), 3),
                          "prompt_tokens": sum(g.prompt_tokens for g in gens),
                          "cached_prompt_tokens": sum(g.cached_prompt_tokens for g in gens)}
    return out


async def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from serving.models.registry import load_registry

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=Path("bench-results/engines.json"))
    parser.add_argument("--compare-nk", type=int, metavar="K",
                        help="instead: one n=K request versus K separate requests (Self-MoA's proposals)")
    args = parser.parse_args()

    registry = load_registry()
    if args.compare_nk:
        results = [await compare_nk(name, args.compare_nk, args.max_tokens, registry) for name in args.models]
        print(json.dumps(results, indent=2))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        return
    results = [await measure(name, args.max_tokens, registry) for name in args.models]

    table = Table(title=f"engines, {len(PROMPTS)} prompts submitted at once, max_tokens={args.max_tokens}")
    for col in ("model", "start s", "n=1 tok/s", "n=4 tok/s", "n=1 TTFT p50", "n=4 TTFT p50",
                "peak engine PSS", "peak total PSS"):
        table.add_column(col)
    for r in results:
        table.add_row(r["model"], str(r["start_s"]), str(r["n1"]["output_tok_s"]), str(r["n4"]["output_tok_s"]),
                      f"{r['n1']['ttft_p50_s']} s", f"{r['n4']['ttft_p50_s']} s",
                      f"{r['peak_engine_pss_gib']} GiB", f"{r['peak_total_pss_gib']} GiB")
    Console().print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
