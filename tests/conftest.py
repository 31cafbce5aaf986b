"""Shared fixtures: the repository's registry and models pulled once into $MOA_HOME.

Real-engine tests need the embedded models on disk; `scripts/test.sh` pulls them
before pytest runs, and `local_model` pulls on demand when run by hand.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from serving.models.registry import Registry, load_registry  # noqa: E402

SMALL = "smollm2-135m"
QWEN_SMALL = "qwen2.5-coder-0.5b"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# A prompt a tiny model answers at length in every dtype: for tests that need a request still running.
COUNT = [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry()


@pytest.fixture(scope="session")
def local_model(registry):
    """Return a function that makes a model's weights available (pulling them once if needed)."""
    from serving.models.pull import pull

    def ensure(name: str):
        spec = registry.get(name)
        pull(spec)
        return spec

    return ensure


@asynccontextmanager
async def small_engines(registry, local_model) -> AsyncIterator[dict]:
    """vLLM engines for the two small embedded models, started for the duration."""
    from serving.engines.pool import EnginePool

    local_model(SMALL)
    local_model(QWEN_SMALL)
    async with EnginePool(registry, [QWEN_SMALL, SMALL]) as pool:
        yield pool.engines


@pytest.fixture(scope="session")
async def small_pool(registry, local_model):
    """The small engines shared by the pipeline and server tests."""
    async with small_engines(registry, local_model) as engines:
        yield engines


@asynccontextmanager
async def uvicorn_serving(app) -> AsyncIterator[str]:
    """Serve an ASGI app on a free loopback port for the duration; yields its base URL."""
    import uvicorn

    from serving.engines.vllm_server import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
