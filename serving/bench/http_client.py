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


async def http_request(client: Any, model: str, messages: Sequence[ChatMessage], index: int, t0: float, *,
                       max_tokens: int | None, seed: int | None, pipeline: bool) -> RequestSample:
    """One streamed chat completion; TTFT is the first content chunk of the answer."""
    import openai

    started = time.perf_counter()
    sample = RequestSample(index, started - t0)
    text: list[str] = []
    try:
        stream = await client.chat.completions.create(
            model=model, messages=list(messages), max_tokens=max_tokens, seed=seed, stream=True,
            stream_options={"include_usage": True}, extra_body={"moa": {"trace": True}} if pipeline else None)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if sample.ttft_s is None:
                    sample.ttft_s = time.perf_counter() - started
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                sample.prompt_tokens = chunk.usage.prompt_tokens
                sample.completion_tokens = chunk.usage.completion_tokens
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                sample.cached_prompt_tokens = (getattr(details, "cached_tokens", None) or 0) if details else 0
            summary = (chunk.model_extra or {}).get("moa")
            if isinstance(summary, dict) and "engine_calls" in summary:
                _apply_summary(sample, summary)
    except openai.APIError as exc:
        sample.latency_s = time.perf_counter() - started
        sample.error = f"{type(exc).__name__}: {exc}"
        return sample
    sample.latency_s = time.perf_counter() - started
    sample.answer = "".join(text)
    if not sample.engine_calls:  # a plain model: one call, the answer is all of its output
        sample.engine_calls = 1
        sample.answer_tokens = sample.completion_tokens
    return sample


async def discover(client: Any) -> dict[str, str]:
    """Served model ids -> "pipeline" or "model" (moa serve marks pipelines in its /v1/models extension)."""
    kinds = {}
    for m in (await client.models.list()).data:
        extra = (m.model_extra or {}).get("moa") or {}
        kinds[m.id] = "pipeline" if extra.get("kind") == "pipeline" else "model"
    return kinds


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
