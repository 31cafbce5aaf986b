"""The `openai` backend retries what failed before any token (a server restarting), and nothing after.

Against a minimal OpenAI-compatible server scripted here (503 for the first requests, then a one-chunk
stream) — the exact failure sequence a real server cannot be made to produce on demand. The backend
against a real vLLM server: tests/test_openai_engine.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from moa.engine import EngineError, SamplingParams
from serving.engines.openai_engine import OpenAIEngine
from serving.models.registry import ModelSpec
from tests.conftest import uvicorn_serving

Q = [{"role": "user", "content": "hi"}]


def flaky_server(failures: int, status: int = 503) -> tuple[FastAPI, list[int]]:
    app, seen = FastAPI(), []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x"}]}

    @app.post("/v1/chat/completions")
    async def chat():
        seen.append(len(seen))
        if len(seen) <= failures:
            return JSONResponse({"error": {"message": "restarting", "type": "x"}}, status_code=status)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}]}
        usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
        return StreamingResponse(iter([body]), media_type="text/event-stream")

    return app, seen


@asynccontextmanager
async def engine_against(app: FastAPI, retries: int) -> AsyncIterator[OpenAIEngine]:
    """An openai-backend engine, started against `app` served on a free port."""
    async with uvicorn_serving(app) as url:
        spec = ModelSpec(name="m", backend="openai", endpoint={"base_url": f"{url}/v1", "vllm_extensions": False,
                                                                 "retries": retries, "retry_backoff_s": 0.01})
        engine = OpenAIEngine(spec)
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_a_restarting_server_is_retried_until_it_answers(status):
    app, seen = flaky_server(failures=2, status=status)
    async with engine_against(app, retries=3) as engine:
        result = await engine.generate(Q, SamplingParams(max_tokens=4))
    assert result.texts == ["hello"] and len(seen) == 3 and engine.stats.extra["retries"] == 2


async def test_retries_are_bounded_and_a_client_error_is_never_retried():
    app, seen = flaky_server(failures=10)
    async with engine_against(app, retries=2) as engine:
        with pytest.raises(EngineError, match="restarting"):
            await engine.generate(Q, SamplingParams(max_tokens=4))
    assert len(seen) == 3  # the first try and two retries
    app, seen = flaky_server(failures=1, status=400)
    async with engine_against(app, retries=3) as engine:
        with pytest.raises(Exception, match="restarting"):
            await engine.generate(Q, SamplingParams(max_tokens=4))
    assert len(seen) == 1
