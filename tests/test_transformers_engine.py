"""The transformers fallback engine on SmolLM2 (CPU, bf16).

Semantics, not wording: the one content check is the known-answer check against float32.
"""

from __future__ import annotations

import asyncio

import pytest

from moa.engine import Delta, InvalidRequest, SamplingParams
from serving.engines.pool import EnginePool
from tests.conftest import FRANCE

pytestmark = pytest.mark.transformers
NAME = "smollm2-135m-hf"


@pytest.fixture(scope="module")
async def hf(registry, local_model):
    local_model(NAME)
    async with EnginePool(registry, [NAME]) as pool:
        yield pool[NAME]


GREEDY = SamplingParams(temperature=0, max_tokens=24)


async def test_greedy_is_deterministic_and_agrees_with_float32(hf, registry):
    from serving.models.known_answer import check_engine, load_reference
    from serving.models.store import resolve

    result = await hf.generate(FRANCE, GREEDY)
    assert result.texts[0].strip() and result.prompt_tokens > 5 and result.completions[0].completion_tokens > 0
    assert result.completions[0].finish_reason == ("length" if result.completion_tokens == 24 else "stop")
    assert (await hf.generate(FRANCE, GREEDY)).texts == result.texts
    check = await check_engine(hf, load_reference(resolve(registry.get(NAME))), dtype=hf.dtype)
    assert hf.dtype == "bfloat16" and check.ok, check.warning()


async def test_concurrent_requests_are_batched_with_n_per_request(hf):
    prompts = [[{"role": "user", "content": f"Count from 1 to {i + 3}."}] for i in range(3)]
    batches = hf.stats.extra.get("batches", 0)
    results = await asyncio.gather(*[
        hf.generate(p, SamplingParams(n=2, temperature=0.7, max_tokens=12)) for p in prompts
    ])
    # The first request may start alone; the two that queue behind it share one generate call.
    assert hf.stats.extra["batches"] - batches <= 2 and hf.stats.extra["largest_batch"] >= 2
    assert [len(r.completions) for r in results] == [2, 2, 2]
    assert all(c.completion_tokens > 0 for r in results for c in r.completions)


async def test_seed_reproduces_per_sample(hf):
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=21)
    first, second = await hf.generate(FRANCE, params), await hf.generate(FRANCE, params)
    assert first.texts == second.texts
    # Sample i is seeded seed + i: sample 1 of seed 21 is sample 0 of seed 22.
    shifted = await hf.generate(FRANCE, SamplingParams(n=1, temperature=1.0, max_tokens=12, seed=22))
    assert shifted.texts[0] == first.texts[1]


async def test_stop_string_ends_and_is_excluded(hf):
    text = (await hf.generate(FRANCE, GREEDY)).texts[0]
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]  # a word from the model's own greedy answer, whatever it says on this CPU
    result = await hf.generate(FRANCE, SamplingParams(temperature=0, max_tokens=24, stop=(stop,)))
    assert result.texts[0] == text[:text.index(stop)] and result.completions[0].finish_reason == "stop"


async def test_stream_and_cancel(hf):
    text, final = "", None
    async for event in hf.stream(FRANCE, SamplingParams(temperature=0, max_tokens=24)):
        if isinstance(event, Delta):
            text += event.text
        else:
            final = event
    assert final.texts[0] == text

    started = asyncio.Event()

    async def consume():
        async for _ in hf.stream(FRANCE, SamplingParams(temperature=1.0, max_tokens=3000)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The cancelled rows stop at the next step: the next request is served promptly.
    result = await asyncio.wait_for(hf.generate(FRANCE, SamplingParams(temperature=0, max_tokens=8)), 20)
    assert result.texts[0]
    assert hf.stats.running == 0 and hf.stats.aborted >= 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
async def test_a_worker_thread_killed_by_a_fatal_error_is_replaced(hf, monkeypatch):
    from moa.engine import EngineError

    real_run, calls = hf._run, []

    def fatal_once(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise SystemExit("simulated fatal error in the worker")
        return real_run(batch)

    monkeypatch.setattr(hf, "_run", fatal_once)
    restarts = hf.stats.restarts
    with pytest.raises(EngineError, match="simulated fatal error"):
        await hf.generate(FRANCE, SamplingParams(temperature=0, max_tokens=4))
    hf._worker.join(5)
    assert not hf._worker.is_alive()  # the thread is gone ...
    result = await asyncio.wait_for(hf.generate(FRANCE, SamplingParams(temperature=0, max_tokens=4)), 60)
    assert result.completions[0].completion_tokens > 0  # ... and the next request is served by a new one
    assert hf.stats.restarts == restarts + 1 and hf._worker.is_alive()


async def test_bad_input_is_an_invalid_request(hf):
    with pytest.raises(InvalidRequest):
        await hf.generate([], SamplingParams())
    with pytest.raises(InvalidRequest, match="context length"):
        await hf.generate(FRANCE, SamplingParams(max_tokens=100_000))


@pytest.mark.parametrize(("quantization", "layer"),
                         [("bitsandbytes", "Linear4bit"), ("bitsandbytes-8bit", "Linear8bitLt")])
async def test_bitsandbytes_configs_quantize_and_answer(registry, local_model, quantization, layer):
    from serving.engines.transformers_engine import TransformersEngine
    from serving.models.store import resolve

    base = local_model(NAME)
    spec = base.model_copy(update={"engine": base.engine.model_copy(update={"quantization": quantization})})
    engine = TransformersEngine(spec, resolve(spec))
    await engine.start()
    try:
        assert type(engine._model.model.layers[0].mlp.down_proj).__name__ == layer
        result = await engine.generate(FRANCE, SamplingParams(temperature=0, max_tokens=16))
        assert result.texts[0].strip() and result.completion_tokens > 0
        assert (await engine.generate(FRANCE, SamplingParams(temperature=0, max_tokens=16))).texts == result.texts
    finally:
        await engine.close()
