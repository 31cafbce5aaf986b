"""`moa bench`: throughput and latency of pipelines against the baselines, on the same engines in one run."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import typer

from serving.bench.environment import machine
from serving.cli.common import (
    CompileOption,
    ConfigOption,
    ProgressBars,
    SpeculativeOption,
    ensure_local,
    err,
    exit_cleanly_on_sigterm,
    parse_swap,
    quiet_engines,
    registry,
    show,
    user_errors,
)
from serving.placement.machine import engine_version

DEFAULT_PIPELINES = ["moa-lite", "self-moa"]


def bench(
    pipeline: list[str] = typer.Option(DEFAULT_PIPELINES, "--pipeline", "-p",
                                       help="Pipeline to measure (repeatable). With --url: served model ids."),
    swap: list[str] = typer.Option([], "--swap", help="Replace a model in every pipeline, OLD=NEW (repeatable)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Cap every step's max_tokens."),
    prompts: Path | None = typer.Option(None, "--prompts", help="JSONL prompt set: {\"prompt\": ...} or "
                                        "{\"messages\": [...]} per line (default: the built-in set of 24)."),
    requests: int | None = typer.Option(None, "--requests", "-n", min=1, help="Requests per system and concurrency "
                                        "level [default: 3 per client, at least 16: a steady state, where p90 is "
                                        "judged]."),
    sequential_requests: int = typer.Option(8, "--sequential-requests", min=1,
                                            help="Requests for the sequential baseline (one at a time, slow)."),
    concurrency: str = typer.Option("1,4,8,16", "--concurrency", help="Concurrent clients, e.g. 1,4,16."),
    systems: str = typer.Option("moa,raw,split-n,sequential,http", "--systems",
                                help="Which of moa, raw, split-n, sequential, http to run."),
    scheduling: str | None = typer.Option(None, "--scheduling", help="vLLM's scheduling policy for every engine: "
                                          "fcfs, or priority (later layers first) [default: models.yaml's]."),
    seed: int = typer.Option(0, "--seed", help="Request i uses seed + 1000*i (sample j: + j)."),
    output: Path | None = typer.Option(None, "--out", "-o", help="Directory for results.json, summary.md and "
                                       "plots (default: bench-results/<date-time>)."),
    url: str | None = typer.Option(None, "--url", help="Measure a running endpoint (moa serve, vLLM) instead."),
    api_key: str = typer.Option(os.environ.get("MOA_API_KEY", "none"), "--api-key", help="For --url."),
    report: list[Path] = typer.Option([], "--report", help="Redraw tables and plots from a results.json; "
                                      "several: merged, later runs replacing the systems they measured (needs --out)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Run the pipelines' engines in Ray actors "
                                           "on this cluster (auto, ray://HOST:10001): Ray vs in-process."),
    compile: bool = CompileOption,
    speculative: str | None = SpeculativeOption,
    config: Path | None = ConfigOption,
) -> None:
    """Measure pipelines at several concurrency levels against the baselines (a) raw engine batch,
    (b) sequential orchestration, (c) HTTP fan-out to vLLM servers, (d) Self-MoA n=k vs k requests.
    On a CPU the defaults take hours; docs/BENCHMARKS.md has a configuration that takes ~40 minutes."""
    from serving.bench.datasets import DEFAULT_PROMPTS, DatasetError, load_prompts
    from serving.bench.suite import SYSTEMS, parse_levels

    exit_cleanly_on_sigterm()
    if ray_address:
        os.environ["MOA_RAY_ADDRESS"] = ray_address  # every engine pool the bench makes reads it
    if report:
        from serving.bench.report import merge

        with user_errors():
            if len(report) > 1 and output is None:
                raise ValueError("merging several --report files needs --out DIR for the merged results")
            data = merge([json.loads(path.read_text()) for path in report])
        target = output or report[0].parent
        target.mkdir(parents=True, exist_ok=True)
        _publish(data, target, write_json=len(report) > 1)
        return
    with user_errors():
        try:
            conversations = load_prompts(prompts)
        except DatasetError as exc:
            raise ValueError(str(exc)) from None
        levels = parse_levels(concurrency)
        chosen = {s.strip() for s in systems.split(",") if s.strip()}
        unknown = chosen - set(SYSTEMS)
        if unknown:
            raise ValueError(f"--systems: unknown {', '.join(sorted(unknown))}; known: {', '.join(SYSTEMS)}")
        out_dir = output or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": "moa bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
            "machine": machine(),
            "prompts": str(prompts or DEFAULT_PROMPTS.name),
            "requests": requests or "3 per client, at least 16",
            "sequential_requests": sequential_requests,
            "concurrency": levels,
            "seed": seed,
            "max_tokens": max_tokens,
        }
        if url:
            meta["engine"] = f"endpoint {url}"
            results = asyncio.run(_bench_url(url, api_key, pipeline, conversations, levels, requests, max_tokens,
                                             seed))
            data = {"meta": meta, "pipelines": results}
        else:
            reg = registry(config, compile=compile, speculative=speculative)
            if compile:
                meta["compile"] = True
            if speculative is not None:
                meta["speculative"] = speculative
            if scheduling is not None:
                if scheduling not in ("fcfs", "priority"):
                    raise ValueError(f"--scheduling must be fcfs or priority, got {scheduling!r}")
                reg = reg.with_engine_args(scheduling_policy=scheduling)
                meta["scheduling"] = scheduling
            mapping = dict(parse_swap(s) for s in swap)
            for name in mapping.values():
                reg.get(name)
            pipes = []
            for name in pipeline:
                pipe = reg.pipeline(name).with_models(mapping)
                pipes.append(pipe.with_max_tokens(max_tokens) if max_tokens else pipe)
            ensure_local(*(reg.get(name) for name in dict.fromkeys(m for p in pipes for m in p.models())))
            meta["engine"] = engine_version()
            data = _bench_local(reg, pipes, conversations, levels, requests, sequential_requests, chosen, seed,
                                out_dir, meta)
    _publish(data, out_dir)


def _bench_local(reg, pipes, conversations, levels, requests, sequential_requests, chosen, seed, out_dir, meta):
    from serving.bench import report as rpt
    from serving.bench.suite import Bench, BenchPlan

    plan = BenchPlan(pipes, conversations, levels, requests, sequential_requests, chosen, seed, out_dir / "logs")
    with quiet_engines(not os.environ.get("MOA_VERBOSE"), "bench") as log_path, ProgressBars() as progress:
        try:
            results = asyncio.run(Bench(reg, plan, progress).run())
        except Exception:
            if log_path:
                err.print(f"engine log: {log_path}", highlight=False, soft_wrap=True)
            raise
    return rpt.to_json(results, meta)


async def _bench_url(url, api_key, models, conversations, levels, requests, max_tokens, seed) -> list[dict]:
    import openai

    from serving.bench.http_client import discover, http_request
    from serving.bench.measure import run_level, summarize
    from serving.bench.suite import level_requests

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=3600)
    try:
        kinds = await discover(client)
    except openai.APIError as exc:
        raise ValueError(f"{url}: the endpoint does not answer /v1/models ({exc})") from None
    missing = [m for m in models if m not in kinds]
    if missing:
        raise ValueError(f"{url} does not serve {', '.join(missing)}; it serves {', '.join(kinds)}")
    measured = []
    with ProgressBars() as progress:
        for model in models:
            entry = {"name": model, "models": [model], "levels": [], "raw": None, "skipped": {}, "comparison": []}
            for c in levels:
                async def request(i: int, t0: float, model: str = model):
                    return await http_request(client, model, conversations[i % len(conversations)], i, t0,
                                              max_tokens=max_tokens, seed=seed + 1000 * i,
                                              pipeline=kinds[model] == "pipeline")

                n = level_requests(requests, c)
                level = await run_level("endpoint", model, request, concurrency=c, requests=n,
                                        on_done=progress(f"{model} · endpoint · c={c}", n))
                entry["levels"].append({**summarize(level), "samples": [asdict(s) for s in level.samples]})
            measured.append(entry)
    await client.close()
    return measured


def _publish(data: dict, out_dir: Path, *, write_json: bool = True) -> None:
    from serving.bench import report as rpt

    for table in rpt.rich_tables(data):
        for column in table.columns[1:]:  # in a narrow terminal, headers and cells wrap rather than end in "…"
            column.no_wrap = False
        show(table)
    for entry in data["pipelines"]:
        for line in rpt.target_lines(entry):
            err.print(f"{entry['name']}: {line}", highlight=False, soft_wrap=True)
    if write_json:
        (out_dir / "results.json").write_text(json.dumps(data, indent=1))
    (out_dir / "summary.md").write_text(rpt.markdown(data))
    written = ([out_dir / "results.json"] if write_json else []) + [out_dir / "summary.md"]
    try:
        written += rpt.plots(data, out_dir)
    except ImportError:
        err.print("[yellow]matplotlib is not installed: no plots (pip install matplotlib)[/yellow]")
    err.print("written: " + ", ".join(str(p) for p in written), highlight=False, soft_wrap=True)
