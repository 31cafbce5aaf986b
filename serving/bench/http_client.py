"""`moa bench --url`: the same measurements against a running OpenAI-compatible endpoint.

Works against `moa serve` (pipelines report their engine calls, tokens and layers
in the `moa` extension of the last chunk) and against any OpenAI-compatible server
(plain vLLM included), where only the standard fields are there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from moa.engine import ChatMessage
from moa.steps import llm_step_kinds
from serving.bench.measure import RequestSample

# `events`: a pipeline whose writer breaks off mid-answer then sends `answer_restarted` and its fallback (the
# answer the non-streaming request returns); without events the stream ends in an error instead.
MOA_OPTIONS = {"moa": {"trace": True, "events": True}}


async def http_request(client: Any, model: str, messages: Sequence[ChatMessage], index: int, t0: float, *,
                       max_tokens: int | None, seed: int | None, pipeline: bool, n: int = 1,
                       temperature: float | None = None) -> RequestSample:
    """One streamed chat completion; TTFT is the first content chunk of the answer. With n > 1 (`moa eval
    --samples`), `answers` holds every choice; `temperature` None leaves the server's (or pipeline's) own."""
    import openai

    started = time.perf_counter()
    sample = RequestSample(index, started - t0)
    text: dict[int, list[str]] = {}
    sampling = {"n": n} if n != 1 else {}
    if temperature is not None:
        sampling["temperature"] = temperature
    try:
        stream = await client.chat.completions.create(
            model=model, messages=list(messages), max_tokens=max_tokens, seed=seed, stream=True,
            stream_options={"include_usage": True}, extra_body=MOA_OPTIONS if pipeline else None, **sampling)
        async for chunk in stream:
            summary = (chunk.model_extra or {}).get("moa")
            if isinstance(summary, dict) and summary.get("event") == "answer_restarted":
                text.clear()  # moa serve replaces a broken-off answer with its fallback: drop what came before
            for choice in chunk.choices or ():
                if choice.delta.content:
                    if sample.ttft_s is None:
                        sample.ttft_s = time.perf_counter() - started
                    text.setdefault(choice.index, []).append(choice.delta.content)
            if chunk.usage is not None:
                sample.prompt_tokens = chunk.usage.prompt_tokens
                sample.completion_tokens = chunk.usage.completion_tokens
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                sample.cached_prompt_tokens = (getattr(details, "cached_tokens", None) or 0) if details else 0
            if isinstance(summary, dict) and "engine_calls" in summary:
                _apply_summary(sample, summary)
    except openai.APIError as exc:
        sample.latency_s = time.perf_counter() - started
        sample.error = f"{type(exc).__name__}: {exc}"
        return sample
    sample.latency_s = time.perf_counter() - started
    sample.answer = "".join(text.get(0, []))
    if n > 1:
        sample.answers = ["".join(text.get(i, [])) for i in range(n)]
    if not sample.engine_calls:  # a plain model: one call, the answer is all of its output
        sample.engine_calls = 1
        sample.answer_tokens = sample.completion_tokens // n
    return sample


async def discover(client: Any) -> dict[str, str]:
    """Served model ids -> "pipeline" or "model" (moa serve marks pipelines in its /v1/models extension)."""
    return {name: kind for name, (kind, _) in (await served(client)).items()}


async def served(client: Any) -> dict[str, tuple[str, list[str]]]:
    """Served model ids -> ("pipeline" or "model", the models it runs): moa serve lists a pipeline's models in
    its /v1/models extension; a plain model (or another server's) runs itself."""
    found = {}
    for m in (await client.models.list()).data:
        extra = (m.model_extra or {}).get("moa") or {}
        if extra.get("kind") == "pipeline":
            found[m.id] = ("pipeline", list(extra.get("models") or []))
        else:
            found[m.id] = ("model", [m.id])
    return found


def _apply_summary(sample: RequestSample, summary: dict) -> None:
    sample.engine_calls = summary.get("engine_calls") or 0
    sample.cost_usd = summary.get("cost_usd") or 0.0
    for layer in summary.get("layers") or []:
        if layer.get("step") in llm_step_kinds():
            sample.layers[f"L{layer.get('layer')} {layer.get('step')}"] = layer.get("seconds") or 0.0
    trace = summary.get("trace") or {}
    calls = [c for c in trace.get("calls", []) if c.get("status") == "ok"]
    if calls:
        sample.answer_tokens = calls[-1]["completion_tokens"] // max(1, calls[-1]["n"])
        firsts = [c["start_s"] + c["ttft_s"] for c in calls if c["layer"] == 1 and c.get("ttft_s") is not None]
        sample.first_token_s = min(firsts) if firsts else None
