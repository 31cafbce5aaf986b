"""Every preset end-to-end on real vLLM CPU engines with the embedded models.

The shipped presets aggregate with the 1.5B model; here it is swapped for the 0.5B
and outputs are capped, so the whole set runs in CI in a couple of minutes.
"""

from __future__ import annotations

import json

import pytest

from moa.runner import run
from tests.conftest import FRANCE, QWEN_SMALL

pytestmark = pytest.mark.vllm
SWAP = {"qwen2.5-coder-1.5b": QWEN_SMALL}
PRESETS = ["together-moa", "moa-lite", "moa", "self-moa", "self-moa-seq", "robust-moa", "pyramid", "council",
           "consensus", "best-of", "chain", "rank", "self-consistency"]


@pytest.fixture(scope="module")
def pool(small_pool):
    return small_pool


@pytest.mark.parametrize("name", PRESETS)
async def test_preset_runs_end_to_end(registry, pool, name):
    pipeline = registry.pipeline(name).with_models(SWAP).with_max_tokens(200 if name == "council" else 24)
    result = await run(pipeline, FRANCE, pool, prices=registry.prices(), seed=7)
    assert result.answer.strip(), result.trace.to_dict()
    assert len(result.trace.steps) == len(pipeline.steps)
    assert all(c.status == "ok" for c in result.trace.calls), [c.error for c in result.trace.calls]
    assert result.usage.completion_tokens > 0 and result.usage.prompt_tokens > 0
    json.dumps(result.trace.to_dict())
    if name == "self-moa":
        propose = [c for c in result.trace.calls if c.step == "propose"]
        assert len(propose) == 1 and propose[0].n == 6  # six samples, one engine request
        assert len(result.responses[0]) == 6
    if name == "council":
        assert set(result.data) >= {"final_answer", "agreement", "disagreement", "follow_up_questions",
                                    "confidence"}, result.data


async def test_synthesis_after_the_conversation_reuses_the_proposal_kv_cache(registry, pool):
    from moa.steps import Aggregate, Pipeline, Propose

    system = {"role": "system", "content": "You are a meticulous geography tutor. " * 40}
    convo = [system, *FRANCE]
    pipeline = Pipeline("cache", (Propose(models=(QWEN_SMALL,), max_tokens=16),
                                  Aggregate(model=QWEN_SMALL, layout="after", max_tokens=16)))
    result = await run(pipeline, convo, pool)
    aggregate = result.trace.calls[-1]
    assert aggregate.cached_prompt_tokens >= 256  # the shared system prompt + question came from the cache
