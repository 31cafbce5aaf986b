"""Concurrent streaming clients against a running `moa serve` (loopback): requests/s, TTFT, errors.

    .venv/bin/python scripts/load_serve.py --url http://127.0.0.1:8000 --model moa-lite --clients 16 --requests 32

Each client uses the official `openai` async client with stream=True; TTFT is the time
to the first content chunk of the final answer. `moa bench` (issue 5) grows out of this.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import openai

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What is 12 times 7?",
    "Give one tip for writing clear code.",
    "What does CPU stand for?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water at sea level in Celsius?",
    "Name a famous physicist.",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="moa-lite")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--api-key", default="none")
    args = parser.parse_args()

    client = openai.AsyncOpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0, timeout=600)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    ttfts: list[float] = []
    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            first = None
            try:
                stream = await client.chat.completions.create(
                    model=args.model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    max_tokens=args.max_tokens, stream=True, stream_options={"include_usage": True})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content and first is None:
                        first = time.perf_counter() - started
                    if chunk.usage:
                        tokens += chunk.usage.completion_tokens
            except openai.APIError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            if first is not None:
                ttfts.append(first)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(args.clients)])
    wall = time.perf_counter() - t0
    ok = len(latencies)
    print(f"model {args.model}: {args.requests} requests, {args.clients} concurrent streaming clients, "
          f"max_tokens {args.max_tokens}")
    print(f"  ok {ok}, errors {len(errors)}, wall {wall:.1f} s, {ok / wall:.3f} requests/s, "
          f"{tokens / wall:.1f} completion tok/s (all engine calls)")
    if ttfts:
        print(f"  TTFT p50 {pct(ttfts, 0.5):.2f} s, p90 {pct(ttfts, 0.9):.2f} s; "
              f"latency p50 {pct(latencies, 0.5):.2f} s, p90 {pct(latencies, 0.9):.2f} s, "
              f"mean {statistics.mean(latencies):.2f} s")
    for error in errors[:5]:
        print("  error:", error)


if __name__ == "__main__":
    asyncio.run(main())
