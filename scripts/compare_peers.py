"""moa-stack versus another MoA implementation on the same engine, closed-loop clients at several levels.

    .venv/bin/pip install --no-deps mixture-llm==0.1.3                 # a client-side MoA library
    .venv/bin/python scripts/compare_peers.py mixture-llm -o docs/results/mixture-llm

    .venv/bin/pip install --no-deps --target /tmp/optillm optillm==0.4.0   # the most used open MoA proxy
    .venv/bin/python scripts/compare_peers.py optillm --peer-path /tmp/optillm -o docs/results/optillm \
        --model qwen2.5-coder-0.5b --max-tokens 128 --clients 1 4 8

The peer runs as its users run it, against vLLM's own OpenAI server (`vllm serve`, the same engine arguments
and every core); moa-stack runs the same recipe in-process on an engine built from the same spec. One after the
other, never together. Each level is closed-loop with `--requests-per-client` x clients requests (a steady
state: every client sends several), after one warm-up request; the prompts are `moa bench`'s built-in set.

- mixture-llm: `Propose([model] * k)` + `Aggregate(model)` through the async `openai` client (k separate
  n=1 HTTP requests, then one more); moa-stack: `propose: {samples: k}` (one n=k request) + `aggregate`.
- optillm: its own `optillm.moa.mixture_of_agents` (one n=3 request at temperature 1, a critique at 0.1 with
  512 tokens, the final answer at 0.1) through the synchronous `openai` client, one thread per request as its
  Flask server runs it. Its package `__init__` imports the whole proxy server (Flask, torch plugins...), so only
  `optillm.moa` and the `conversation_logger` it imports are loaded, under an empty `optillm` package.
  moa-stack runs its `optillm-moa` preset with `--model` in every step and `--max-tokens` on the proposals and
  the answer (the critique keeps the preset's 512, as optillm's does).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import platform
import sys
import tempfile
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moa.pipeline import Pipeline  # noqa: E402
from moa.presets import parse_pipeline  # noqa: E402
from moa.steps import Aggregate, Propose, Synthesize  # noqa: E402
from serving.bench.datasets import load_prompts  # noqa: E402
from serving.bench.measure import RequestFn, RequestSample, pipeline_request, run_level, summarize  # noqa: E402
from serving.engines.pool import EnginePool, split_cores  # noqa: E402
from serving.engines.vllm_server import VLLMServer  # noqa: E402
from serving.models.registry import load_registry  # noqa: E402

MIXTURE_LLM_TEMPERATURE = 0.7


def _query(messages) -> tuple[str, str]:
    """(system prompt, last user message): what a peer that takes a query rather than a conversation sees."""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    return system, next(m["content"] for m in reversed(messages) if m["role"] == "user")


@dataclass
class Peer:
    name: str
    version: str
    recipe: str  # one line for the summary
    moa_pipeline: Callable[[argparse.Namespace], Pipeline]
    # (server base URL, args, prompts, max clients) -> the request function the levels call
    requester: Callable[[str, argparse.Namespace, list, int], RequestFn]


# --- mixture-llm -------------------------------------------------------------------------------------------

def mixture_llm_peer(args: argparse.Namespace) -> Peer:
    try:
        import mixture_llm
    except ImportError:
        sys.exit("mixture-llm is not installed: .venv/bin/pip install --no-deps mixture-llm==0.1.3")

    def moa_pipeline(a: argparse.Namespace) -> Pipeline:
        return parse_pipeline("compare", {"steps": [
            {"propose": {"models": [a.model], "samples": a.samples, "temperature": MIXTURE_LLM_TEMPERATURE,
                         "max_tokens": a.max_tokens}},
            {"aggregate": {"model": a.model, "temperature": MIXTURE_LLM_TEMPERATURE, "max_tokens": a.max_tokens}},
        ]}, [a.model])

    def requester(base_url: str, a: argparse.Namespace, prompts: list, clients: int) -> RequestFn:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=600)

        async def call(*, model: str, messages, temp: float, max_tokens: int):
            r = await client.chat.completions.create(model=model, messages=messages, temperature=temp,
                                                     max_tokens=max_tokens)
            return r.choices[0].message.content or "", r.usage.prompt_tokens, r.usage.completion_tokens

        pipeline = [mixture_llm.Propose([a.model] * a.samples, temp=MIXTURE_LLM_TEMPERATURE, max_tokens=a.max_tokens),
                    mixture_llm.Aggregate(a.model, temp=MIXTURE_LLM_TEMPERATURE, max_tokens=a.max_tokens)]

        async def request(i: int, t0: float) -> RequestSample:
            started = time.perf_counter()
            sample = RequestSample(i, started - t0)
            try:
                answer, history = await mixture_llm.run(pipeline, _query(prompts[i % len(prompts)])[1], call)
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

        return request

    return Peer("mixture-llm", mixture_llm.__version__,
                f"{args.samples} samples + 1 aggregation at temperature {MIXTURE_LLM_TEMPERATURE}, max_tokens "
                f"{args.max_tokens} on both; mixture-llm: {args.samples} + 1 HTTP requests (async client); "
                "moa-stack: one n=k request + 1", moa_pipeline, requester)


# --- optillm -----------------------------------------------------------------------------------------------

def _load_optillm_moa(path: Path) -> tuple[types.ModuleType, str]:
    """`optillm.moa` without optillm's package __init__ (which starts importing the whole proxy server)."""
    package_dir = path / "optillm"
    if not (package_dir / "moa.py").is_file():
        sys.exit(f"optillm is not at {path}: .venv/bin/pip install --no-deps --target {path} optillm==0.4.0")
    version = next((d.name.removesuffix(".dist-info").split("-")[1] for d in path.glob("optillm-*.dist-info")), "?")
    package = types.ModuleType("optillm")
    package.__path__ = [str(package_dir)]
    package.__version__ = version
    sys.modules["optillm"] = package
    return importlib.import_module("optillm.moa"), version


class _CountingClient:
    """The synchronous OpenAI client as optillm calls it (`client.chat.completions.create`), keeping each
    call's usage so the report can give prompt and completion tokens per request."""

    def __init__(self, client) -> None:
        self._client = client
        self.chat = self.completions = self
        self.usages: list = []

    def create(self, **kwargs):
        response = self._client.chat.completions.create(**kwargs)
        self.usages.append(response.usage)
        return response


def optillm_peer(args: argparse.Namespace) -> Peer:
    moa_module, version = _load_optillm_moa(args.peer_path)

    def moa_pipeline(a: argparse.Namespace) -> Pipeline:
        preset = load_registry().pipeline("optillm-moa")
        steps = []
        for step in preset.steps:
            if isinstance(step, (Propose, Synthesize)):
                step = replace(step, models=(a.model,))
            elif isinstance(step, Aggregate):
                step = replace(step, model=a.model)
            if isinstance(step, (Propose, Aggregate)):  # the critique keeps its 512, as optillm's does
                step = replace(step, max_tokens=a.max_tokens)
            steps.append(step)
        return replace(preset, steps=tuple(steps))

    def requester(base_url: str, a: argparse.Namespace, prompts: list, clients: int) -> RequestFn:
        from openai import OpenAI

        client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=600)
        threads = ThreadPoolExecutor(max_workers=clients, thread_name_prefix="optillm-request")

        async def request(i: int, t0: float) -> RequestSample:
            system, query = _query(prompts[i % len(prompts)])
            counting = _CountingClient(client)
            started = time.perf_counter()
            sample = RequestSample(i, started - t0)
            try:
                answer, _tokens = await asyncio.get_running_loop().run_in_executor(
                    threads, lambda: moa_module.mixture_of_agents(system, query, counting, a.model,
                                                                  {"max_tokens": a.max_tokens}))
            except Exception as exc:
                sample.error = f"{type(exc).__name__}: {exc}"
            sample.latency_s = time.perf_counter() - started
            sample.engine_calls = len(counting.usages)
            sample.prompt_tokens = sum(u.prompt_tokens for u in counting.usages)
            sample.completion_tokens = sum(u.completion_tokens for u in counting.usages)
            sample.answer_tokens = counting.usages[-1].completion_tokens if counting.usages else 0
            sample.answer = answer if sample.error is None else ""
            return sample

        return request

    return Peer("optillm", version,
                "one n=3 request at temperature 1, a critique at 0.1 (512 tokens), the answer at 0.1; max_tokens "
                f"{args.max_tokens} on the proposals and the answer; optillm: `mixture_of_agents` with the sync "
                "client, a thread per request; moa-stack: the `optillm-moa` preset", moa_pipeline, requester)


PEERS = {"mixture-llm": mixture_llm_peer, "optillm": optillm_peer}


# --- the runs ----------------------------------------------------------------------------------------------

async def run_peer(peer: Peer, registry, args, prompts, log_dir: Path) -> list[dict]:
    server = VLLMServer(registry.get(args.model), log_dir / f"vllm-server-{args.model}.log",
                        cpu_threads_bind=split_cores(1)[0])
    server.start()
    try:
        levels = []
        for clients in args.clients:
            request = peer.requester(server.base_url, args, prompts, clients)
            if not levels:
                warm = await request(0, time.perf_counter())
                if warm.error:
                    raise SystemExit(f"{peer.name}'s warm-up request failed: {warm.error}")
            levels.append(summarize(await run_level(peer.name, "compare", request, concurrency=clients,
                                                    requests=clients * args.requests_per_client)))
        return levels
    finally:
        server.stop()


async def run_moa(pipeline: Pipeline, registry, args, prompts) -> list[dict]:
    async with EnginePool(registry, [args.model], verify=False) as pool:
        await pipeline_request(pipeline, prompts[0], pool.engines, 0, time.perf_counter())  # warm-up

        async def request(i: int, t0: float) -> RequestSample:
            return await pipeline_request(pipeline, prompts[i % len(prompts)], pool.engines, i, t0)

        return [summarize(await run_level("moa-stack", pipeline.name, request, concurrency=clients,
                                          requests=clients * args.requests_per_client))
                for clients in args.clients]


def row(name: str, s: dict) -> str:
    lat, per = s["latency_s"], s["per_request"]
    return (f"| {name} | {s['concurrency']} | {s['requests'] - s['errors']}/{s['requests']} | "
            f"{s['request_throughput']:.3f} | {s['output_tokens_per_s']:.1f} | {lat['p50']:.2f} | {lat['p90']:.2f} | "
            f"{per['engine_calls']:.1f} | {per['prompt_tokens']:.0f} / {per['completion_tokens']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--peer-path", type=Path, default=Path("/tmp/optillm"),
                        help="optillm: the directory its wheel was installed into with --target")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=3, help="mixture-llm: proposals per request")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--clients", type=int, nargs="+", default=[8])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()

    peer = PEERS[args.peer](args)
    registry = load_registry()
    prompts = load_prompts()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as logs:
        theirs = asyncio.run(run_peer(peer, registry, args, prompts, Path(logs)))
    ours = asyncio.run(run_moa(peer.moa_pipeline(args), registry, args, prompts))
    command = "python scripts/compare_peers.py " + " ".join(sys.argv[1:])
    ratios = [{"clients": o["concurrency"],
               "throughput_ratio": o["request_throughput"] / t["request_throughput"],
               "p90_ratio": o["latency_s"]["p90"] / t["latency_s"]["p90"],
               "p50_ratio": o["latency_s"]["p50"] / t["latency_s"]["p50"]} for o, t in zip(ours, theirs, strict=True)]
    results = {"command": command, "machine": platform.processor() or platform.machine(), "peer": peer.name,
               "peer_version": peer.version, "model": args.model, "recipe": peer.recipe,
               "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
               "peer_levels": theirs, "moa_stack_levels": ours, "ratios": ratios}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# moa-stack vs {peer.name} {peer.version}", "", f"Command: `{command}`", "",
             f"{args.model}: {peer.recipe}. Closed-loop clients, {args.requests_per_client} requests per client "
             "at each level, after one warm-up request.", "",
             "| system | clients | ok | req/s | output tok/s | e2e p50 s | e2e p90 s | engine calls/req | "
             "prompt / compl. tok/req |", "|---|---|---|---|---|---|---|---|---|"]
    for t, o in zip(theirs, ours, strict=True):
        lines += [row(f"{peer.name} (vLLM OpenAI server)", t), row("moa-stack (in-process)", o)]
    lines += ["", "moa-stack ÷ " + peer.name + ": " + "; ".join(
        f"{r['clients']} clients **{r['throughput_ratio']:.2f}x** req/s, p50 {r['p50_ratio']:.2f}x, "
        f"p90 **{r['p90_ratio']:.2f}x**" for r in ratios) + ".", ""]
    summary = "\n".join(lines)
    (args.out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
