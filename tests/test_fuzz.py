"""Fuzz the HTTP API from its own OpenAPI document (schemathesis) against real engines.

Done over a real socket, with the server in this test's event loop (where the engines live) and
schemathesis as a separate process: what a client sees — 0 server errors, every response as documented,
schema-violating input refused. Every check runs except `positive_data_acceptance`, whose premise (any
schema-valid body must succeed) no API with cross-field rules meets: n > 1 needs temperature > 0, a
pipeline's conversation must end with a user message — each refused with a 400 that says so.
"""

from __future__ import annotations

import asyncio
import json
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
    settings = ServerSettings(api_keys=["fuzz"], request_timeout_s=10, max_concurrency=4,
                              votes_path=tmp_path / "votes.jsonl")
    app = create_app(registry, models=[SMALL, QWEN_SMALL], pipelines={"moa-lite": pipeline}, settings=settings,
                     engines=small_pool)
    report = tmp_path / "schemathesis.json"
    async with uvicorn_serving(app) as url:
        process = await asyncio.create_subprocess_exec(
            cli, "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run", f"{url}/openapi.json",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "50", "--seed", "1",
            "--generation-database", "none",
            "--header", "Authorization: Bearer fuzz", "--max-time", "60", "--request-timeout", "30",
            "--max-response-time", "20", "--no-color", "--report", "json", "--report-json-path", str(report),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
    text = output.decode(errors="replace")
    (tmp_path / "schemathesis.txt").write_text(text)
    result = json.loads(report.read_text())
    # The run ends at its time budget (exit code 1 then, with or without findings): the report is the verdict.
    assert result["failures"] == [] and result["errors"] == [], f"{tmp_path}:\n{text[-6000:]}"
    assert result["operations"]["tested"] == result["operations"]["total"] == 7  # with the playground's votes
    assert result["test_cases"]["generated"] >= 100 and result["test_cases"]["with_failures"] == 0
