"""`moa eval --url`: the same harness against a running OpenAI-compatible server (moa serve, vLLM's own).

Systems are names the server serves: a model answers greedily (or n samples per request with `--samples`),
a moa pipeline with its own sampling. No engine starts here; the answers are scored locally (HumanEval's
tests in the sandbox), as in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from moa.pipeline import Pipeline
from serving.bench.eval_suites import Item, Suite
from serving.bench.evaluate import System, SystemResult, score_answers, single_model
from serving.bench.http_client import http_request, served
from serving.bench.measure import RequestSample, run_level


def client_for(url: str, api_key: str) -> Any:
    import openai

    # No retries: a failed request is counted as a wrong answer, as in-process; an hour-long timeout for
    # slow CPU servers with many requests in flight.
    return openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=3600)


async def served_systems(client: Any, url: str, names: Sequence[str], *, max_tokens: int | None, samples: int = 1,
                         temperature: float | None = None) -> list[System]:
    """The named served models and pipelines; a ValueError names what the server serves instead."""
    import openai

    try:
        found = await served(client)
    except openai.APIError as exc:
        raise ValueError(f"{url}: the endpoint does not answer /v1/models ({exc})") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{url} does not serve {', '.join(missing)}; it serves {', '.join(found) or 'nothing'}")
    systems = []
    for name in names:
        kind, models = found[name]
        if kind == "model":
            system = single_model(name, max_tokens=max_tokens, samples=samples, temperature=temperature)
            system.served = "model"
        else:  # its steps live on the server; /v1/models says which models it runs
            system = System(name, Pipeline(name, ()), served="pipeline", served_models=tuple(models))
        systems.append(system)
    return systems


async def answer_served(client: Any, system: System, items: Sequence[Item], suite: Suite, *, concurrency: int,
                        seed: int | None, max_tokens: int | None,
                        on_done: Callable[[RequestSample], None] | None = None) -> SystemResult:
    """Every item asked of the server (`concurrency` requests in flight), then scored by `suite` here."""
    step = system.pipeline.steps[0] if system.served == "model" else None

    async def request(i: int, t0: float) -> RequestSample:
        return await http_request(
            client, system.label, items[i].conversation(), i, t0, seed=None if seed is None else seed + 1000 * i,
            max_tokens=step.max_tokens if step else max_tokens, pipeline=system.served == "pipeline",
            n=system.samples, temperature=step.temperature if step else None)

    level = await run_level(system.label, system.label, request, concurrency=concurrency, requests=len(items),
                            on_done=on_done)
    return await score_answers(SystemResult(system, level.samples, level.wall_s), items, suite)
