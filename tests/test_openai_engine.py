"""The `openai` engine against a real vLLM OpenAI server, started by a fixture.

Semantics only (counts, determinism, aborts); whether the server's answers are right is
checked against the float32 reference through the server's own prompt logprobs.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from moa.engine import Delta, EngineError, InvalidRequest, SamplingParams
from serving.engines.openai_engine import OpenAIEngine
from serving.engines.vllm_server import VLLMServer, free_port
from serving.models.known_answer import check_engine, load_reference
from serving.models.registry import Endpoint, ModelSpec
from serving.models.store import resolve
from tests.conftest import COUNT, FRANCE, SMALL

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_server(registry, local_model, small_pool, tmp_path_factory):
    """A vLLM OpenAI server for SmolLM2, with the engine arguments moa uses in-process, including the dtype
    the in-process pool settled on (float32 on a CPU whose bf16 kernels fail the known-answer check)."""
    spec = local_model(SMALL)
    spec = spec.model_copy(update={"engine": spec.engine.model_copy(update={"dtype": small_pool[SMALL].dtype})})
    server = VLLMServer(spec, tmp_path_factory.mktemp("vllm-server") / "server.log", startup_timeout_s=600)
    try:
        server.start()
    except EngineError as exc:
        pytest.fail(str(exc))
    try:
        yield server.base_url
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def remote(vllm_server):
    spec = ModelSpec(name="smol-remote", backend="openai",
                     endpoint=Endpoint(base_url=f"{vllm_server}/v1", model=SMALL))
    engine = OpenAIEngine(spec)
    await engine.start()
    yield engine
    await engine.close()


def running_on_server(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("vllm:num_requests_running")]
    return sum(values)


GREEDY = SamplingParams(temperature=0, max_tokens=24)


async def test_greedy_is_deterministic_with_counts(remote):
    result = await remote.generate(FRANCE, GREEDY)
    assert result.texts[0].strip() and result.prompt_tokens > 5 and result.completion_tokens > 0
    assert result.ttft_s is not None and result.ttft_s <= result.total_s
    assert (await remote.generate(FRANCE, GREEDY)).texts == result.texts


async def test_the_server_agrees_with_the_float32_reference(remote, registry):
    reference = load_reference(resolve(registry.get(SMALL)))
    result = await check_engine(remote, reference, dtype="served")
    assert result.ok and result.decisive >= 40, result.warning()


async def test_n_is_passed_and_tokens_are_counted_per_choice(remote):
    result = await remote.generate(FRANCE, SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=11))
    assert len(result.completions) == 3
    assert all(c.completion_tokens > 0 for c in result.completions)
    again = await remote.generate(FRANCE, SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=11))
    assert again.texts == result.texts


async def test_stream_matches_final(remote):
    text, final = "", None
    async for event in remote.stream(FRANCE, GREEDY):
        if isinstance(event, Delta):
            text += event.text
        else:
            final = event
    assert final is not None and final.texts[0] == text and text.strip()
    assert (await remote.generate(FRANCE, GREEDY)).texts[0] == text


async def test_cached_prompt_tokens_are_reported(remote):
    system = {"role": "system", "content": "You answer briefly and precisely. " * 80}
    await remote.generate([system, {"role": "user", "content": "Name a colour."}], SamplingParams(max_tokens=4))
    second = await remote.generate([system, {"role": "user", "content": "Name a fruit."}], SamplingParams(max_tokens=4))
    assert second.cached_prompt_tokens >= 256


async def test_cancel_closes_the_connection_and_the_server_aborts(remote, vllm_server):
    got_token = asyncio.Event()

    async def consume():
        # A counting prompt, greedy: the tiny model counts on for hundreds of tokens in every dtype, so the
        # request is still running when it is cancelled (a sampled answer may end at EOS within a second).
        async for event in remote.stream(COUNT, SamplingParams(temperature=0, max_tokens=2000)):
            if isinstance(event, Delta) and event.text:
                got_token.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_token.wait(), 30)
    for _ in range(25):  # the server's gauge is updated once per scheduler step
        if running_on_server(vllm_server) == 1 or task.done():
            break
        await asyncio.sleep(0.2)
    assert not task.done(), "the request ended by itself before it could be cancelled"
    assert running_on_server(vllm_server) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(50):
        if running_on_server(vllm_server) == 0:
            break
        await asyncio.sleep(0.2)
    assert running_on_server(vllm_server) == 0
    assert remote.stats.aborted >= 1 and remote.stats.running == 0


async def test_server_side_rejection_is_an_invalid_request(remote):
    with pytest.raises(InvalidRequest, match="smol-remote"):
        await remote.generate(FRANCE, SamplingParams(max_tokens=100_000))


async def test_wrong_served_name_fails_at_start(vllm_server):
    spec = ModelSpec(name="x", backend="openai", endpoint=Endpoint(base_url=f"{vllm_server}/v1", model="nope"))
    with pytest.raises(EngineError, match="serves \\['smollm2-135m'\\], not 'nope'"):
        await OpenAIEngine(spec).start()


async def test_unreachable_server_fails_at_start():
    spec = ModelSpec(name="gone", backend="openai",
                     endpoint=Endpoint(base_url=f"http://127.0.0.1:{free_port()}/v1", timeout_s=5))
    with pytest.raises(EngineError, match="model 'gone': the server at .* does not answer"):
        await OpenAIEngine(spec).start()


async def test_raw_prompt_uses_the_completions_api(remote):
    result = await remote.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=6))
    assert result.texts[0] and result.prompt_tokens == 5  # the raw prompt, untemplated
    assert result.completions[0].completion_tokens == 6 or result.completions[0].finish_reason == "stop"
