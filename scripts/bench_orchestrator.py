"""The orchestrator's own CPU time per engine call, with instant engines (target: <= 2 ms per call).

    .venv/bin/python scripts/bench_orchestrator.py [--runs 200] [--pipeline together-moa]

Engines answer at once with a precomputed result, so all CPU time measured is the
runner's: prompt building, reference budgets (token counting), tasks, trace, events.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from moa.engine import Completion, Generation, SamplingParams, StreamingEngine
from moa.runner import run
from serving.models.registry import load_registry

TEXT = "Paris is the capital of France. " * 20  # ~120 words per response, like a short real answer


class InstantEngine(StreamingEngine):
    def __init__(self, name: str, tokenizer=None) -> None:
        self.name = name
        self.tokenizer = tokenizer

    def count_tokens(self, text: str) -> int:
        # With --tokenizer, reference budgets count real tokens, as they do with a vLLM engine.
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if self.tokenizer else len(text) // 4

    async def generate(self, messages, params: SamplingParams, *, request_id=None) -> Generation:
        return Generation(self.name, tuple(Completion(i, TEXT, 120, "stop") for i in range(params.n)),
                          prompt_tokens=100, cached_prompt_tokens=0, ttft_s=0.0, total_s=0.0)

    async def stream(self, messages, params, *, request_id=None):
        yield await self.generate(messages, params)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--pipeline", action="append", help="preset name (repeatable; default: several)")
    parser.add_argument("--tokenizer", metavar="MODEL",
                        help="count reference tokens with this pulled model's tokenizer")
    args = parser.parse_args()
    registry = load_registry()
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        from serving.models.store import resolve

        tokenizer = AutoTokenizer.from_pretrained(str(resolve(registry.get(args.tokenizer)).path))
    names = args.pipeline or ["moa-lite", "together-moa", "self-moa", "self-moa-seq", "pyramid", "council"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    print(f"{'pipeline':<16}{'calls/run':>10}{'CPU ms/run':>12}{'CPU ms/call':>13}")
    for name in names:
        pipeline = registry.pipeline(name)
        engines = {m: InstantEngine(m, tokenizer) for m in pipeline.models()}
        result = await run(pipeline, messages, engines, seed=0)  # warm-up
        calls = result.usage.engine_calls
        cpu0 = time.process_time()
        for _ in range(args.runs):
            await run(pipeline, messages, engines, seed=0)
        cpu = (time.process_time() - cpu0) / args.runs
        print(f"{name:<16}{calls:>10}{cpu * 1e3:>12.3f}{cpu * 1e3 / calls:>13.3f}")


if __name__ == "__main__":
    asyncio.run(main())
