"""`moa run`: answer one question with a pipeline or a single model, streaming the answer."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import typer

from serving.cli.common import (
    ConfigOption,
    SpeculativeOption,
    ensure_local,
    err,
    out,
    parse_swap,
    quiet_engines,
    registry,
    show,
    user_errors,
)
from serving.cli.trace_table import trace_table


def run(
    question: str = typer.Argument(..., help="The question (a one-message conversation)."),
    pipeline: str | None = typer.Option(None, "--pipeline", "-p", help="Pipeline (preset) from models.yaml."),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="One model from models.yaml (default: default_model)."),
    system: str | None = typer.Option(None, "--system", help="Optional system message."),
    n: int = typer.Option(1, "--n", min=1, help="Model mode: samples drawn in one engine request."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="Model mode: 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1,
                                          help="Model mode: default 256. Pipelines: caps every step."),
    seed: int | None = typer.Option(None, "--seed", help="Sample i uses seed + i."),
    swap: list[str] = typer.Option([], "--swap", help="Pipelines: run with a model replaced, e.g. "
                                   "--swap qwen2.5-coder-1.5b=qwen2.5-coder-0.5b (repeatable)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Pipelines: per engine call, seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole result (texts, tokens, timings) as JSON."),
    show_trace: bool = typer.Option(False, "--trace", help="Pipelines: print every engine call as a table."),
    allow_code_execution: bool = typer.Option(False, "--allow-code-execution", help="Pipelines with a `check` step: "
                                              "run the responses' code, and the question's own examples and "
                                              "asserts, in bubblewrap's sandbox (no network, read-only files, "
                                              "CPU/memory/time limits; refused where bwrap cannot start)."),
    speculative: str | None = SpeculativeOption,
    config: Path | None = ConfigOption,
) -> None:
    """Answer QUESTION with a pipeline (--pipeline) or one local model, streaming the answer to stdout."""
    reg = registry(config, speculative=speculative)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    with user_errors():
        if pipeline and model:
            raise ValueError("give --pipeline or --model, not both")
        if pipeline:
            pipe = reg.pipeline(pipeline)
            mapping = dict(parse_swap(s) for s in swap)
            for name in mapping.values():
                reg.get(name)
            pipe = pipe.with_models(mapping)
            if pipe.runs_code() and not allow_code_execution:
                raise ValueError(f"pipeline {pipe.name!r} runs model-written code (a check step): pass "
                                 "--allow-code-execution to run it in the sandbox")
            if max_tokens is not None:
                pipe = pipe.with_max_tokens(max_tokens)
            names = list(pipe.models())
        else:
            from moa.engine import SamplingParams

            target = model or reg.default_model  # a model, or an adapter (BASE:ADAPTER) its base engine serves
            reg.get(target)
            params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens or 256,
                                    seed=seed)
            names = [target]
        ensure_local(*(reg.get(name) for name in names))
        with quiet_engines(not os.environ.get("MOA_VERBOSE"), "-".join(names)[:100]) as log_path:
            try:
                if pipeline:
                    result = asyncio.run(_run_pipeline(reg, pipe, messages, seed=seed, timeout=timeout,
                                                       stream=not as_json, code=allow_code_execution))
                else:
                    result = asyncio.run(_answer(reg, target, messages, params, stream=not as_json))
            except Exception:
                if log_path:
                    err.print(f"engine log: {log_path}", highlight=False, soft_wrap=True)
                raise
    if pipeline:
        _report_pipeline(result, as_json, show_trace)
    elif as_json:
        print(json.dumps(asdict(result), indent=2))
    else:
        err.print(
            f"[dim]{target}: {result.prompt_tokens} prompt tokens ({result.cached_prompt_tokens} cached), "
            f"{result.completion_tokens} completion tokens, TTFT {result.ttft_s or 0:.2f} s, "
            f"total {result.total_s:.2f} s[/dim]",
            highlight=False,
            soft_wrap=True,
        )


async def _run_pipeline(reg, pipe, messages, *, seed, timeout, stream: bool, code: bool = False):
    from moa.runner import RunResult, iter_run
    from moa.trace import AnswerDelta, AnswerRestarted, CallFinished, StepStarted
    from serving.engines.pool import EnginePool
    from serving.sandbox import check_sandbox

    engines = reg.engine_names(list(pipe.models()))
    with err.status(f"starting {len(engines)} engine(s): {', '.join(engines)}…"):
        pool = EnginePool(reg, pipe.models())
        await pool.start()
    try:
        result = None
        status = err.status(f"{pipe.name}: running…")
        status.start()
        answering = False
        async for event in iter_run(pipe, messages, pool.engines, prices=reg.prices(), seed=seed,
                                    timeout_s=timeout, scorers=reg.scorers(),
                                    code_runner=check_sandbox() if code else None):
            if isinstance(event, RunResult):
                result = event
            elif isinstance(event, AnswerDelta) and stream:
                if not answering:
                    status.stop()
                    answering = True
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, AnswerRestarted) and stream:
                sys.stdout.write("\n")
                err.print(f"[yellow]the answer above broke off ({event.reason}); the fallback answer follows[/yellow]",
                          highlight=False, soft_wrap=True)
            elif isinstance(event, StepStarted) and not answering:
                status.update(f"{pipe.name}: layer {event.layer} ({event.step})…")
            elif isinstance(event, CallFinished) and not answering:
                status.update(f"{pipe.name}: layer {event.layer} ({event.step}) — {event.model} {event.status}")
        status.stop()
        if stream:  # the runner's answer chunks add up to the answer, whichever step came last
            sys.stdout.write("\n")
        return result
    finally:
        await pool.close()


def _report_pipeline(result, as_json: bool, show_trace: bool) -> None:
    if as_json:
        print(json.dumps({"answer": result.answer, "data": result.data, "trace": result.trace.to_dict()}, indent=2))
        return
    if result.data and len(result.data) > 1:
        out.print_json(data=result.data)
    usage = result.usage
    err.print(
        f"[dim]{result.trace.pipeline}: {usage.engine_calls} engine calls, {usage.prompt_tokens} prompt tokens "
        f"({usage.cached_prompt_tokens} cached), {usage.completion_tokens} completion tokens, "
        f"{result.trace.total_s:.1f} s[/dim]", highlight=False, soft_wrap=True)
    if show_trace:
        show(trace_table(result.trace))


async def _answer(reg, name, messages, params, *, stream: bool):
    from moa.engine import Delta, Generation
    from serving.engines.pool import EnginePool

    with err.status(f"starting {name}…"):
        pool = EnginePool(reg, [name])
        await pool.start()
    try:
        engine = pool[name]
        if not stream:
            return await engine.generate(messages, params)
        result: Generation | None = None
        async for event in engine.stream(messages, params):
            if isinstance(event, Delta):
                if params.n == 1:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
            else:
                result = event
        if params.n == 1:
            sys.stdout.write("\n")
        else:  # interleaved samples would be unreadable: print each one whole
            for c in result.completions:
                print(f"--- sample {c.index} ({c.completion_tokens} tokens, {c.finish_reason})\n{c.text}")
        return result
    finally:
        await pool.close()
