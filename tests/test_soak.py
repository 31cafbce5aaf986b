"""The soak in miniature (CI): 16 streaming clients for 30 s on real engines, mixing base models and pipelines,
some leaving mid-stream, some sending junk. The 5-minute, 64-client run is scripts/soak.py."""

from __future__ import annotations

import os

import psutil
import pytest

from serving.api.app import ServerSettings, create_app
from serving.bench.soak import soak
from tests.conftest import QWEN_SMALL, SMALL, uvicorn_serving

pytestmark = pytest.mark.vllm


async def test_thirty_seconds_of_mixed_load_answers_everything_and_leaves_nothing_running(registry, small_pool):
    swap = {"qwen2.5-coder-1.5b": QWEN_SMALL}
    pipelines = {n: registry.pipeline(n).with_models(swap) for n in ("moa-lite", "self-moa")}
    app = create_app(registry, models=[SMALL, QWEN_SMALL], pipelines=pipelines,
                     settings=ServerSettings(max_concurrency=8, max_queue=8), engines=small_pool)
    process = psutil.Process(os.getpid())
    async with uvicorn_serving(app) as url:
        report = await soak(url, [SMALL, QWEN_SMALL, *pipelines], clients=16, duration_s=30, max_tokens=16,
                            leave_rate=0.2, junk_rate=0.1, rss=lambda: process.memory_info().rss)
    assert not report.problems, report.to_dict()
    assert report.outcomes["done"] >= 10 and report.outcomes["left"] >= 1 and report.outcomes["junk-4xx"] >= 1, \
        report.to_dict()
    assert report.running_after and not any(report.running_after.values())
    assert report.rss_end_mib - report.rss_start_mib < 512, report.to_dict()
