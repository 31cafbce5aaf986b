"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP, on real vLLM engines."""

from __future__ import annotations

import asyncio
import json
import re
from contextlib import asynccontextmanager

import httpx
import openai
import pytest

from serving.api.app import ServerSettings, create_app
from serving.models.registry import load_registry
from tests.conftest import QWEN_SMALL, SMALL, uvicorn_serving

pytestmark = pytest.mark.vllm
SWAP = {"qwen2.5-coder-1.5b": QWEN_SMALL}
# Every preset is served but lora-moa, whose adapters need their own LoRA engine (tests/test_adapters.py serves it).
PIPELINES = [n for n in load_registry().pipeline_names if n != "lora-moa"]
Q = [{"role": "user", "content": "What is the capital of France?"}]
ESSAY = [{"role": "user", "content": "Write a very long, detailed essay on the history of Paris."}]


@asynccontextmanager
async def serving(registry, engines, settings: ServerSettings | None = None, *, ready: bool = True):
    pipelines = {n: registry.pipeline(n).with_models(SWAP) for n in PIPELINES}
    app = create_app(registry, models=[QWEN_SMALL, SMALL], pipelines=pipelines, settings=settings,
                     engines=engines if ready else None)
    if not ready:  # no engines: the app would start its own; keep it "starting" instead
        app.router.lifespan_context = _idle_lifespan
    async with uvicorn_serving(app) as url:
        yield url, app


@asynccontextmanager
async def _idle_lifespan(app):
    yield


@pytest.fixture(scope="module")
async def server(registry, small_pool):
    # Code execution on: every preset is served, the code presets' check steps included (the 400 it gives
    # when off is tested in test_code_checks).
    settings = ServerSettings(max_concurrency=8, max_queue=32, code_execution=True)
    async with serving(registry, small_pool, settings) as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    return openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0)


async def test_health_ready_and_models(server):
    url, _ = server
    async with httpx.AsyncClient(base_url=url) as http:
        health = (await http.get("/health")).json()
        assert health["status"] == "ok" and set(health["engines"]) == {QWEN_SMALL, SMALL}
        engine = health["engines"][SMALL]
        assert engine["placement"] == "local" and isinstance(engine["restarts"], int)  # shared: others restart it
        assert (await http.get("/ready")).status_code == 200
    models = await openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x").models.list()
    ids = {m.id: m for m in models.data}
    assert {QWEN_SMALL, SMALL, *PIPELINES} <= set(ids)
    lite = ids["moa-lite"].model_extra["moa"]
    assert lite["kind"] == "pipeline" and [s["step"] for s in lite["steps"]] == ["propose", "aggregate"]
    assert set(lite["models"]) == {QWEN_SMALL, SMALL}


async def engine_greedy(engines, messages, max_tokens: int):
    """What the engine itself answers greedily: the server must pass exactly this through."""
    from moa.engine import SamplingParams

    return await engines[SMALL].generate(messages, SamplingParams(temperature=0, max_tokens=max_tokens))


async def test_base_model_with_the_async_client(client, small_pool):
    out = await client.chat.completions.create(model=SMALL, messages=Q, temperature=0, max_tokens=24)
    assert out.choices[0].message.content == (await engine_greedy(small_pool, Q, 24)).texts[0]
    assert out.object == "chat.completion"
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    many = await client.chat.completions.create(model=SMALL, messages=Q, n=3, temperature=0.9, max_tokens=12,
                                                seed=4)
    assert [c.index for c in many.choices] == [0, 1, 2]


async def test_pipeline_with_the_sync_client(server):
    def call():
        sync = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0)
        return sync.chat.completions.create(model="moa-lite", messages=Q, max_tokens=24,
                                            extra_body={"moa": {"trace": True}})

    out = await asyncio.to_thread(call)
    assert out.choices[0].message.content.strip() and out.model == "moa-lite"
    moa = out.model_extra["moa"]
    assert moa["engine_calls"] == len(moa["trace"]["calls"]) == 3  # qwen x2 collapsed to one n=2 call
    assert out.usage.total_tokens == moa["trace"]["usage"]["total_tokens"]
    assert [layer["step"] for layer in moa["layers"]] == ["propose", "aggregate"]


@pytest.mark.parametrize("preset", PIPELINES)
async def test_every_preset_through_the_official_client(client, preset):
    out = await client.chat.completions.create(model=preset, messages=Q, max_tokens=200 if preset == "council" else 16,
                                               seed=3)
    assert out.choices[0].message.content.strip() and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens > 0 and out.model_extra["moa"]["pipeline"] == preset


async def test_overrides_in_extra_body(client):
    out = await client.chat.completions.create(
        model="moa-lite", messages=Q, max_tokens=16,
        extra_body={"moa": {"proposers": [SMALL, SMALL, SMALL], "aggregator": SMALL, "layers": 4,
                            "strategy": "consensus", "quorum": 2, "trace": True}})
    calls = out.model_extra["moa"]["trace"]["calls"]
    assert {c["model"] for c in calls} == {SMALL}
    # 4 layers: one n=3 proposal request, two synthesize layers of the three proposers, one aggregate.
    assert [(c["layer"], c["step"], c["n"]) for c in calls] == [
        (1, "propose", 3), *[(2, "synthesize", 1)] * 3, *[(3, "synthesize", 1)] * 3, (4, "aggregate", 1)]


async def test_streaming_base_model_and_usage(client, small_pool):
    stream = await client.chat.completions.create(model=SMALL, messages=Q, temperature=0, max_tokens=24, stream=True,
                                                  stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    direct = await engine_greedy(small_pool, Q, 24)
    assert text == direct.texts[0] and usage.completion_tokens == direct.completion_tokens


async def test_streaming_pipeline_with_progress_events(client):
    stream = await client.chat.completions.create(model="self-moa", messages=Q, max_tokens=16, stream=True,
                                                  extra_body={"moa": {"events": True}})
    text, events, summary, roles = "", [], None, []
    async for chunk in stream:  # progress events are chunks with choices: [] and a `moa` field
        if chunk.choices:
            if not text and not roles:  # the role goes out with the first answer token, not before layer 1
                roles.append((chunk.choices[0].delta.role, bool(chunk.choices[0].delta.content)))
            text += chunk.choices[0].delta.content or ""
        elif "event" in (chunk.model_extra.get("moa") or {}):
            events.append(chunk.model_extra["moa"]["event"])
        elif chunk.model_extra.get("moa"):
            summary = chunk.model_extra["moa"]
    assert text.strip() and roles == [("assistant", True)]
    assert events[0] == "layer_started" and "call_finished" in events and events[-1] == "layer_finished"
    assert summary["engine_calls"] == 2


async def test_sse_wire_format_byte_for_byte(server, small_pool):
    from moa.engine import Delta, SamplingParams

    url, _ = server
    body = {"model": SMALL, "messages": Q, "temperature": 0, "max_tokens": 8, "stream": True}
    async with httpx.AsyncClient(base_url=url) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([part async for part in r.aiter_bytes()])
    ids = set(re.findall(rb'"id":"(chatcmpl-[0-9a-f]{32})"', raw))
    created = set(re.findall(rb'"created":(\d+)', raw))
    assert len(ids) == 1 and len(created) == 1
    normal = raw.replace(ids.pop(), b"ID").replace(b'"created":' + created.pop(), b'"created":0')
    # The engine's own deltas for the same greedy request (its wording depends on the CPU; the format does not).
    deltas = [e async for e in small_pool[SMALL].stream(Q, SamplingParams(temperature=0, max_tokens=8))
              if isinstance(e, Delta)]
    assert deltas and deltas[-1].finish_reason in ("stop", "length")
    head = b'{"id":"ID","object":"chat.completion.chunk","created":0,"model":"smollm2-135m","choices":'
    expected = b""
    for i, delta in enumerate(deltas):
        content = ({"role": "assistant", "content": delta.text} if i == 0 else {"content": delta.text})
        expected += b"data: " + head + json.dumps(
            [{"index": 0, "delta": content, "finish_reason": delta.finish_reason, "logprobs": None}],
            separators=(",", ":")).encode() + b"}\n\n"
    expected += b"data: [DONE]\n\n"
    assert normal == expected


@pytest.mark.parametrize(("kwargs", "status", "fragment"), [
    ({"model": "nope"}, 404, "neither a served model nor a pipeline"),
    ({"n": 0}, 400, "n"),
    ({"temperature": 3}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user"}]}, 400, "content"),
    ({"max_tokens": 100_000}, 400, "context length"),
    ({"n": 2, "temperature": 0}, 400, "n > 1"),
    ({"model": "moa-lite", "n": 2}, 400, "n must be 1 for a pipeline"),
    ({"model": "moa-lite", "extra_body": {"moa": {"proposers": ["ghost"]}}}, 400, "'ghost' is not served"),
    ({"model": "moa-lite", "extra_body": {"moa": {"colour": "red"}}}, 400, "colour"),
    ({"model": "adaptive-self-moa", "extra_body": {"moa": {"quorum": 2}}}, 400, "pipelines with a propose step"),
])
async def test_errors_map_to_openai_statuses(client, kwargs, status, fragment):
    args = {"model": SMALL, "messages": Q, "max_tokens": 8, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(**args)
    assert err.value.status_code == status
    assert fragment in err.value.body["message"] or fragment in (err.value.body.get("param") or "")
    assert err.value.body["type"]


async def test_oversized_body_is_413(server):
    async with httpx.AsyncClient(base_url=server[0]) as http:
        huge = {"model": SMALL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
        r = await http.post("/v1/chat/completions", json=huge)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


async def wait_idle(engines, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.1)):
        if all(e.running_requests == 0 for e in engines.values()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError({n: e.running_requests for n, e in engines.items()})


async def test_client_disconnect_aborts_engine_work(server, small_pool):
    url, _ = server
    body = {"model": QWEN_SMALL, "messages": ESSAY, "temperature": 1.0, "max_tokens": 2000, "stream": True}
    async with httpx.AsyncClient(base_url=url) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_bytes():
                break
        await wait_idle(small_pool)
        # Non-streaming pipeline: the client gives up after a second; the server cancels the whole run.
        req = {"model": "self-moa", "messages": ESSAY, "max_tokens": 2000}
        task = asyncio.create_task(http.post("/v1/chat/completions", json=req, timeout=60))
        await asyncio.sleep(1.5)
        assert small_pool[QWEN_SMALL].running_requests >= 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_idle(small_pool)
        metrics = (await http.get("/metrics")).text
    assert 'moa_requests_aborted_total{model="qwen2.5-coder-0.5b",reason="client_gone"} 1.0' in metrics
    assert 'moa_requests_aborted_total{model="self-moa",reason="client_gone"} 1.0' in metrics


def counter(text: str, line: str) -> float:
    match = re.search(re.escape(line) + r" ([0-9.e+]+)", text)
    return float(match.group(1)) if match else 0.0


async def test_metrics_count_requests_tokens_and_calls(server, client):
    ok = 'moa_requests_total{model="self-consistency",status="200"}'
    async with httpx.AsyncClient(base_url=server[0]) as http:
        before = counter((await http.get("/metrics")).text, ok)
        await client.chat.completions.create(model="self-consistency", messages=Q, max_tokens=8)
        text = (await http.get("/metrics")).text
    assert counter(text, ok) == before + 1
    assert re.search(r'moa_tokens_total\{kind="completion",model="self-consistency"\} [1-9]', text)
    assert re.search(r'moa_engine_calls_total\{engine="qwen2.5-coder-0.5b",status="ok"\} [1-9]', text)
    assert "moa_request_latency_seconds_bucket" in text and "moa_requests_in_flight 0.0" in text


async def test_auth_busy_timeout_and_not_ready(registry, small_pool):
    settings = ServerSettings(api_keys=["secret"], max_concurrency=1, max_queue=0, request_timeout_s=3)
    async with serving(registry, small_pool, settings) as (url, _):
        anonymous = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await anonymous.chat.completions.create(model=SMALL, messages=Q)
        authed = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        long = authed.chat.completions.create(model=QWEN_SMALL, messages=ESSAY, max_tokens=2000, temperature=1.0)
        first = asyncio.create_task(long)
        await asyncio.sleep(0.5)
        with pytest.raises(openai.RateLimitError) as busy:
            await authed.chat.completions.create(model=SMALL, messages=Q, max_tokens=4)
        assert busy.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.APIStatusError) as slow:
            await first  # runs past the 3 s request timeout
        assert slow.value.status_code == 504
        await wait_idle(small_pool)
        # A stream that runs past the timeout ends with an error event, which the client raises.
        stream = await authed.chat.completions.create(model=QWEN_SMALL, messages=ESSAY, max_tokens=2000,
                                                      temperature=1.0, stream=True)
        with pytest.raises(openai.APIError, match="no answer within 3"):
            async for _ in stream:
                pass
        await wait_idle(small_pool)
    async with serving(registry, None, ready=False) as (url, _):
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/ready")).status_code == 503
            r = await http.post("/v1/chat/completions", json={"model": SMALL, "messages": Q})
        assert r.status_code == 503 and r.headers["retry-after"] == "10"
        assert r.json()["error"]["code"] == "model_loading" and SMALL in r.json()["error"]["message"]


async def test_response_format_json_schema_is_guided_decoding_on_vllm(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    out = await client.chat.completions.create(
        model=SMALL, messages=[{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}],
        max_tokens=40, temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "a",
                                                                                              "schema": schema}})
    data = json.loads(out.choices[0].message.content)
    assert isinstance(data, dict) and isinstance(data["city"], str)


async def test_completions_endpoint_for_base_models(client, small_pool):
    from moa.engine import SamplingParams

    out = await client.completions.create(model=SMALL, prompt="The capital of France is", temperature=0,
                                          max_tokens=6)
    direct = await small_pool[SMALL].generate("The capital of France is", SamplingParams(temperature=0, max_tokens=6))
    assert out.object == "text_completion" and out.choices[0].text == direct.texts[0]
    assert out.usage.prompt_tokens == 5  # raw prompt: no chat template around it
    stream = await client.completions.create(model=SMALL, prompt="The capital of France is", temperature=0,
                                             max_tokens=6, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == out.choices[0].text
    with pytest.raises(openai.BadRequestError, match="pipeline"):
        await client.completions.create(model="moa-lite", prompt="hi")


async def test_bench_url_mode_measures_a_served_pipeline_and_model(server):
    """`moa bench --url`: client-side TTFT and latency, and the pipeline's own calls and layers from `moa`."""
    from serving.cli.bench import _bench_url

    url, _ = server
    prompts = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Name a fruit."}]]
    entries = await _bench_url(url, "none", ["moa-lite", SMALL], prompts, [1, 2], 2, 8, 0)
    lite, base = entries
    for level in lite["levels"]:
        assert level["errors"] == 0 and level["requests"] == 2
        assert level["per_request"]["engine_calls"] == 3  # qwen n=2 + smollm2, then the aggregate
        assert level["ttft_s"]["p50"] is not None and level["ttft_s"]["p50"] <= level["latency_s"]["p50"]
        assert set(level["layer_latency_s"]) == {"L1 propose", "L2 aggregate"}
    assert base["levels"][0]["per_request"]["engine_calls"] == 1
    assert base["levels"][0]["per_request"]["completion_tokens"] > 0


async def test_response_cache_on_disk_answers_after_a_restart(registry, small_pool, tmp_path):
    settings = ServerSettings(cache_entries=8, cache_path=tmp_path / "answers")
    answers, calls = [], []
    for _ in range(2):  # two servers, one after the other, on the same file
        async with serving(registry, small_pool, settings) as (url, _):
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            before = small_pool[SMALL].stats.started
            answers.append(await client.chat.completions.create(model=SMALL, messages=Q, max_tokens=8, temperature=0))
            calls.append(small_pool[SMALL].stats.started - before)
    assert calls == [1, 0] and answers[1].model_extra["moa"] == {"cached": True}
    assert answers[1].choices[0].message.content == answers[0].choices[0].message.content


async def test_a_token_ceiling_skips_the_aggregator_and_still_answers(server):
    url, _ = server
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    capped = await client.chat.completions.create(model="moa-lite", messages=Q, max_tokens=8, seed=1,
                                                  extra_body={"moa": {"max_total_tokens": 40, "trace": True}})
    moa = capped.model_extra["moa"]
    statuses = [c["status"] for c in moa["trace"]["calls"]]
    assert statuses == ["ok", "ok", "skipped"] and moa["engine_calls"] == 2 and capped.choices[0].message.content
    assert "max_total_tokens 40" in moa["trace"]["calls"][-1]["error"]
    assert "layer failed" in moa["layers"][-1]["notes"][-1]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="moa-lite", messages=Q, extra_body={"moa": {"max_total_tokens": 0}})


async def test_response_cache_answers_deterministic_repeats_without_engine_calls(registry, small_pool):
    async with serving(registry, small_pool, ServerSettings(cache_entries=8)) as (url, _):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        engine = small_pool[SMALL]

        async def ask(max_tokens: int = 8, **kwargs):
            before = engine.stats.started
            out = await client.chat.completions.create(model=SMALL, messages=Q, max_tokens=max_tokens, **kwargs)
            return out, engine.stats.started - before

        first, calls = await ask(temperature=0)
        again, repeat_calls = await ask(temperature=0)
        assert (calls, repeat_calls) == (1, 0)
        assert again.choices[0].message.content == first.choices[0].message.content and again.id != first.id
        assert again.model_extra["moa"] == {"cached": True} and not (first.model_extra or {}).get("moa")
        assert (await ask(temperature=0, max_tokens=9))[1] == 1  # another parameter, another key
        assert (await ask(temperature=0, extra_headers={"Cache-Control": "no-cache"}))[1] == 1
        assert (await ask(temperature=0, extra_body={"moa": {"cache": False}}))[1] == 1
        assert [(await ask(temperature=1.0))[1] for _ in range(2)] == [1, 1]  # sampled: never from the cache
        seeded = [await ask(temperature=1.0, seed=5) for _ in range(2)]
        assert [c for _, c in seeded] == [1, 0]
        # A seeded pipeline: the repeat makes no engine call at all.
        started = {name: e.stats.started for name, e in small_pool.items()}
        answers = [await client.chat.completions.create(model="moa-lite", messages=Q, max_tokens=8, seed=3)
                   for _ in range(2)]
        assert answers[1].model_extra["moa"]["cached"] is True
        assert answers[1].choices[0].message.content == answers[0].choices[0].message.content
        assert sum(e.stats.started - started[n] for n, e in small_pool.items()) == \
            answers[0].model_extra["moa"]["engine_calls"]
        async with httpx.AsyncClient(base_url=url) as http:
            metrics = (await http.get("/metrics")).text
        assert counter(metrics, 'moa_cache_lookups_total{result="hit"}') == 3
