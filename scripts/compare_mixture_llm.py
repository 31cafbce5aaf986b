"""moa-stack versus mixture-llm on the same engine: k samples + one aggregation, closed-loop clients.

    .venv/bin/pip install --no-deps mixture-llm==0.1.3      # the peer: a client-side MoA library
    .venv/bin/python scripts/compare_mixture_llm.py -o docs/results/mixture-llm
        [--model smollm2-135m] [--samples 3] [--max-tokens 96] [--clients 8] [--requests 24]

mixture-llm runs as its users run it: `Propose([model] * k)` + `Aggregate(model)` through the official
`openai` client against vLLM's own OpenAI server (k separate HTTP requests, n=1 each, then one more).
moa-stack runs the same pipeline in-process (`propose: {samples: k}` is one n=k request, then
`aggregate`). Both engines get the same engine arguments and the same cores (one engine: every core),
and run one after the other, never together. Both sample at temperature 0.7 with the same max_tokens
on both layers; the prompts are `moa bench`'s built-in set. The report gives request throughput,
end-to-end p50/p90 and tokens per request for each, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moa.presets import parse_pipeline  # noqa: E402
from serving.bench.datasets import load_prompts  # noqa: E402
from serving.bench.measure import RequestSample, pipeline_request, run_level, summarize  # noqa: E402
from serving.engines.pool import EnginePool, split_cores  # noqa: E402
from serving.engines.vllm_server import VLLMServer  # noqa: E402
from serving.registry import load_registry  # noqa: E402

TEMPERATURE = 0.7


async def run_moa(registry, model: str, samples: int, max_tokens: int, prompts, clients: int, requests: int):
    pipeline = parse_pipeline("compare", {"steps": [
        {"propose": {"models": [model], "samples": samples, "temperature": TEMPERATURE, "max_tokens": max_tokens}},
        {"aggregate": {"model": model, "temperature": TEMPERATURE, "max_tokens": max_tokens}},
    ]}, [model])
    async with EnginePool(registry, [model], verify=False) as pool:
        await pipeline_request(pipeline, prompts[0], pool.engines, 0, time.perf_counter())  # warm-up

        async def request(i: int, t0: float) -> RequestSample:
            return await pipeline_request(pipeline, prompts[i % len(prompts)], pool.engines, i, t0)

        return await run_level("moa-stack", "compare", request, concurrency=clients, requests=requests)


async def run_mixture_llm(registry, model: str, samples: int, max_tokens: int, prompts, clients: int,
                          requests: int, log_dir: Path):
    import mixture_llm
    from openai import AsyncOpenAI

    spec = registry.get(model)
    server = VLLMServer(spec, log_dir / f"vllm-server-{model}.log", cpu_threads_bind=split_cores(1)[0])
    server.start()
    try:
        client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=600)

        async def call(*, model: str, messages, temp: float, max_tokens: int):
            r = await client.chat.completions.create(model=model, messages=messages, temperature=temp,
                                                     max_tokens=max_tokens)
            return r.choices[0].message.content or "", r.usage.prompt_tokens, r.usage.completion_tokens

        pipeline = [mixture_llm.Propose([model] * samples, temp=TEMPERATURE, max_tokens=max_tokens),
                    mixture_llm.Aggregate(model, temp=TEMPERATURE, max_tokens=max_tokens)]

        async def request(i: int, t0: float) -> RequestSample:
            messages = prompts[i % len(prompts)]
            query = next(m["content"] for m in reversed(messages) if m["role"] == "user")
            started = time.perf_counter()
            sample = RequestSample(i, started - t0)
            try:
                answer, history = await mixture_llm.run(pipeline, query, call)
            except Exception as exc:
                sample.error = f"{type(exc).__name__}: {exc}"
                sample.latency_s = time.perf_counter() - started
                return sample
            sample.latency_s = time.perf_counter() - started
            calls = [c for step in history for c in step["llm_calls"]]
            errors = [c["error"] for c in calls if "error" in c]
            sample.error = errors[0] if errors else None
            sample.engine_calls = len(calls)
            sample.prompt_tokens = sum(c["in_tokens"] for c in calls)
            sample.completion_tokens = sum(c["out_tokens"] for c in calls)
            sample.answer_tokens = history[-1]["llm_calls"][0]["out_tokens"] if history[-1]["llm_calls"] else 0
            sample.answer = answer
            return sample

        await request(0, time.perf_counter())  # warm-up
        return await run_level("mixture-llm", "compare", request, concurrency=clients, requests=requests)
    finally:
        server.stop()


def row(name: str, s: dict) -> str:
    lat, per = s["latency_s"], s["per_request"]
    return (f"| {name} | {s['requests'] - s['errors']}/{s['requests']} | {s['request_throughput']:.3f} | "
            f"{s['output_tokens_per_s']:.1f} | {lat['p50']:.2f} | {lat['p90']:.2f} | {per['engine_calls']:.1f} | "
            f"{per['prompt_tokens']:.0f} / {per['completion_tokens']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        import mixture_llm
    except ImportError:
        sys.exit("mixture-llm is not installed: .venv/bin/pip install --no-deps mixture-llm==0.1.3")

    registry = load_registry()
    prompts = load_prompts()
    args.out.mkdir(parents=True, exist_ok=True)
    common = (registry, args.model, args.samples, args.max_tokens, prompts, args.clients, args.requests)
    with tempfile.TemporaryDirectory() as logs:
        peer = summarize(asyncio.run(run_mixture_llm(*common, Path(logs))))
    ours = summarize(asyncio.run(run_moa(*common)))
    ratio_tp = ours["request_throughput"] / peer["request_throughput"]
    ratio_p90 = ours["latency_s"]["p90"] / peer["latency_s"]["p90"]
    command = "python scripts/compare_mixture_llm.py " + " ".join(sys.argv[1:])
    results = {"command": command, "machine": platform.processor() or platform.machine(),
               "mixture_llm_version": mixture_llm.__version__, "model": args.model, "samples": args.samples,
               "max_tokens": args.max_tokens, "clients": args.clients, "requests": args.requests,
               "mixture_llm": peer, "moa_stack": ours, "throughput_ratio": ratio_tp, "p90_ratio": ratio_p90}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    summary = "\n".join([
        f"# moa-stack vs mixture-llm {mixture_llm.__version__}", "", f"Command: `{command}`", "",
        f"{args.model}: {args.samples} samples + 1 aggregation, max_tokens {args.max_tokens}, temperature "
        f"{TEMPERATURE}; {args.clients} closed-loop clients, {args.requests} requests in all, after one warm-up "
        "request.", "",
        "| system | ok | req/s | output tok/s | e2e p50 s | e2e p90 s | engine calls/req | prompt / compl. tok/req |",
        "|---|---|---|---|---|---|---|---|",
        row(f"mixture-llm (vLLM OpenAI server, {args.samples} + 1 HTTP requests)", peer),
        row("moa-stack (in-process, one n=k request + 1)", ours), "",
        f"moa-stack ÷ mixture-llm: **{ratio_tp:.2f}x** requests/s, p90 **{ratio_p90:.2f}x**.", ""])
    (args.out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
