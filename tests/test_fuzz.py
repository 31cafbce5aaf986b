"""Fuzz the HTTP API from its own OpenAPI document (schemathesis, every check) against real engines.

Done over a real socket, with the server in this test's event loop (where the engines live) and
schemathesis as a separate process: what a client sees — 0 server errors, every response as documented.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from serving.api.app import ServerSettings, create_app
from tests.conftest import QWEN_SMALL, SMALL, uvicorn_serving

pytestmark = pytest.mark.vllm


async def test_schemathesis_finds_no_server_error_and_no_undocumented_response(registry, small_pool, tmp_path):
    cli = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    pipeline = registry.pipeline("moa-lite").with_models({"qwen2.5-coder-1.5b": QWEN_SMALL}).with_max_tokens(16)
    settings = ServerSettings(api_keys=["fuzz"], request_timeout_s=30, max_concurrency=4)
    app = create_app(registry, models=[SMALL, QWEN_SMALL], pipelines={"moa-lite": pipeline}, settings=settings,
                     engines=small_pool)
    async with uvicorn_serving(app) as url:
        process = await asyncio.create_subprocess_exec(
            cli, "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", "25", "--seed", "1",
            "--header", "Authorization: Bearer fuzz", "--max-time", "300", "--request-timeout", "60",
            "--no-color", "--report", "junit", "--report-dir", str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]  # schemathesis exits 1 on any failed check
    assert "POST /v1/chat/completions" in text and "GET /metrics" in text, text[-3000:]  # both were exercised
