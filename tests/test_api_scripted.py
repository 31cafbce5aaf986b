"""What an HTTP client sees, on scripted engines: exact failures at exact points, and the exact sampling each
engine call received (real-engine tests: tests/test_server.py, tests/test_vllm_engine.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from moa.pipeline import Pipeline
from moa.steps import Aggregate, Propose
from moa.testing import ScriptedEngine
from moa.transform_steps import MajorityVote
from serving.api.app import ServerSettings, create_app
from serving.models.known_answer import CaseResult, CheckResult
from serving.models.registry import load_registry
from tests.conftest import QWEN_SMALL, SMALL, uvicorn_serving

Q = [{"role": "user", "content": "What is 2 + 2?"}]


async def until(condition, timeout_s: float = 10.0) -> None:
    """Wait for `condition()` to hold (the server's start task runs beside the test)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


def broken_aggregator_app(fail_after: int):
    """moa over one proposer; the aggregator's engine dies after `fail_after` words of its answer."""
    engines = {SMALL: ScriptedEngine(SMALL), QWEN_SMALL: ScriptedEngine(QWEN_SMALL, fail="connection lost",
                                                                        fail_after=fail_after)}
    pipeline = Pipeline("p", (Propose(models=(SMALL,)), Aggregate(model=QWEN_SMALL)))
    return create_app(load_registry(), models=[], pipelines={"p": pipeline}, settings=ServerSettings(),
                      engines=engines), engines


FALLBACK = f"{SMALL} answer 0 seed 1"  # the proposal, kept when the aggregator failed


async def sse_data(http: httpx.AsyncClient, body: dict) -> list[str]:
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        return [line.removeprefix("data: ") async for line in response.aiter_lines() if line.startswith("data: ")]


def content_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))


async def test_an_events_stream_whose_aggregator_breaks_off_gets_the_fallback_answer_the_json_path_returns():
    app, _ = broken_aggregator_app(fail_after=2)
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        whole = (await http.post("/v1/chat/completions", json={"model": "p", "messages": Q, "seed": 1})).json()
        answer = whole["choices"][0]["message"]["content"]
        assert answer == FALLBACK
        lines = await sse_data(http, {"model": "p", "messages": Q, "seed": 1, "stream": True,
                                      "moa": {"events": True}})
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    restarts = [i for i, c in enumerate(chunks) if (c.get("moa") or {}).get("event") == "answer_restarted"]
    assert len(restarts) == 1, chunks
    content = [content_of(part) for part in (chunks[:restarts[0]], chunks[restarts[0]:])]
    assert content == [f"{QWEN_SMALL} answer", answer]  # the broken-off words, then the whole fallback
    assert chunks[restarts[0]]["moa"]["discarded"] == len(content[0])
    assert "connection lost" in chunks[restarts[0]]["moa"]["reason"]
    assert chunks[-1]["moa"]["engine_calls"] == 2 and not any("error" in c for c in chunks)


async def test_a_plain_stream_whose_aggregator_breaks_off_ends_in_an_error_and_never_gets_void_text():
    """Text already sent cannot be taken back: a client that reads no `choices: []` chunks gets the words it
    was sent, then an error saying they broke off and where the answer is; never the fallback joined on."""
    app, engines = broken_aggregator_app(fail_after=2)
    metrics = app.state.moa.metrics.registry
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        lines = await sse_data(http, {"model": "p", "messages": Q, "seed": 1, "stream": True,
                                      "stream_options": {"include_usage": True}})
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        assert content_of(chunks) == f"{QWEN_SMALL} answer"  # what the aggregator wrote before it died
        assert "error" in chunks[-1] and not any("error" in c for c in chunks[:-1])
        assert not any("moa" in c for c in chunks)  # no event, no summary: the stream carried no answer
        error = chunks[-1]["error"]
        assert (error["code"], error["type"]) == ("answer_broken_off", "service_unavailable")
        for said in ("broke off", "aggregate", QWEN_SMALL, "connection lost", "without stream", "moa.events"):
            assert said in error["message"], (said, error["message"])
        assert not any(FALLBACK in line for line in lines)

        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        received = []
        stream = await client.chat.completions.create(model="p", messages=Q, seed=1, stream=True)
        try:
            async for chunk in stream:
                received.extend(c.delta.content or "" for c in chunk.choices)
            raise AssertionError(f"the stream ended without an error after {''.join(received)!r}")
        except openai.APIError as exc:
            assert exc.body["code"] == "answer_broken_off" and "connection lost" in exc.message
        assert "".join(received) == f"{QWEN_SMALL} answer"
        await client.close()
    assert metrics.get_sample_value("moa_requests_total", {"model": "p", "status": "503"}) == 2
    assert metrics.get_sample_value("moa_engine_calls_total", {"engine": QWEN_SMALL, "status": "error"}) == 2
    assert metrics.get_sample_value("moa_engine_calls_total", {"engine": SMALL, "status": "ok"}) == 2
    assert not any(call.aborted for engine in engines.values() for call in engine.calls)


async def test_a_plain_stream_whose_aggregator_fails_before_its_first_word_gets_exactly_the_fallback():
    app, _ = broken_aggregator_app(fail_after=0)  # nothing of the aggregator was sent: nothing to void
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        lines = await sse_data(http, {"model": "p", "messages": Q, "seed": 1, "stream": True})
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        stream = await client.chat.completions.create(model="p", messages=Q, seed=1, stream=True)
        received = [c.delta.content or "" async for chunk in stream for c in chunk.choices]
        await client.close()
    chunks = [json.loads(line) for line in lines[:-1]]
    assert lines[-1] == "[DONE]" and not any("error" in c for c in chunks)
    assert content_of(chunks) == FALLBACK == "".join(received)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and "engine_calls" in chunks[-1]["moa"]


def scripted_app(**pipelines: Pipeline):
    engines = {SMALL: ScriptedEngine(SMALL), QWEN_SMALL: ScriptedEngine(QWEN_SMALL)}
    return create_app(load_registry(), models=[SMALL], pipelines=pipelines, settings=ServerSettings(),
                      engines=engines), engines


async def test_temperature_top_p_and_stop_shape_the_step_that_writes_a_pipelines_answer():
    written = Pipeline("p", (Propose(models=(SMALL,), temperature=0.8), Aggregate(model=QWEN_SMALL)))
    app, engines = scripted_app(p=written, vote=Pipeline("vote", (Propose(models=(SMALL,), samples=3), MajorityVote())))
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        ok = await http.post("/v1/chat/completions", json={"model": "p", "messages": Q, "temperature": 0.2,
                                                           "top_p": 0.5, "stop": ["END"]})
        assert ok.status_code == 200
        proposal, aggregate = engines[SMALL].calls[-1].params, engines[QWEN_SMALL].calls[-1].params
        assert (aggregate.temperature, aggregate.top_p, aggregate.stop) == (0.2, 0.5, ("END",))
        assert (proposal.temperature, proposal.top_p, proposal.stop) == (0.8, 1.0, ())  # the pipeline's own
        default = await http.post("/v1/chat/completions", json={"model": "p", "messages": Q})
        assert default.status_code == 200 and engines[QWEN_SMALL].calls[-1].params.temperature == 0.7
        picked = await http.post("/v1/chat/completions", json={"model": "vote", "messages": Q, "temperature": 0})
        assert picked.status_code == 400 and picked.json()["error"]["param"] == "temperature"
        assert "picked by its last step (majority-vote)" in picked.json()["error"]["message"]


async def test_tools_are_refused_and_response_format_is_for_base_models():
    app, engines = scripted_app(p=Pipeline("p", (Propose(models=(SMALL,)),)))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        for body in ({"tools": [tool]}, {"tool_choice": "auto"}, {"functions": [tool["function"]]}):
            r = await http.post("/v1/chat/completions", json={"model": SMALL, "messages": Q, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == "tools", body
        fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
        r = await http.post("/v1/chat/completions", json={"model": SMALL, "messages": Q, "response_format": fmt})
        assert r.status_code == 200 and engines[SMALL].calls[-1].params.json_schema == schema
        r = await http.post("/v1/chat/completions", json={"model": SMALL, "messages": Q,
                                                          "response_format": {"type": "json_object"}})
        assert engines[SMALL].calls[-1].params.json_schema == {"type": "object"}
        r = await http.post("/v1/chat/completions", json={"model": "p", "messages": Q, "response_format": fmt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        assert (await http.post("/v1/chat/completions", json={"model": SMALL, "messages": Q,
                                                              "tool_choice": "none"})).status_code == 200


async def test_call_deltas_add_only_empty_choice_chunks_and_leave_the_answer_as_a_plain_client_gets_it():
    app, _ = scripted_app(p=Pipeline("p", (Propose(models=(SMALL, QWEN_SMALL)), Aggregate(model=QWEN_SMALL))))

    async def stream(http, **moa) -> list[dict]:
        body = {"model": "p", "messages": Q, "seed": 3, "stream": True, **({"moa": moa} if moa else {})}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            return [json.loads(line[6:]) async for line in response.aiter_lines()
                    if line.startswith("data: {")]

    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        plain, watched = await stream(http), await stream(http, call_deltas=True)
    answer = [c["choices"] for c in plain if c["choices"]]
    assert [c["choices"] for c in watched if c["choices"]] == answer  # the same content chunks, in order
    events = [c["moa"] for c in watched if not c["choices"] and "event" in c.get("moa", {})]
    assert all(not c["choices"] for c in watched if "event" in c.get("moa", {}))
    deltas = [e for e in events if e["event"] == "call_delta"]
    assert {e["call"] for e in deltas} == {0, 1, 2}
    rebuilt = "".join(e["text"] for e in deltas if e["call"] == 2)
    assert rebuilt == "".join(ch[0]["delta"].get("content", "") for ch in answer)
    assert not any("event" in c.get("moa", {}) for c in plain)  # nothing extra for a plain client


async def test_a_silent_stream_sends_keep_alive_comments_and_leaving_during_one_aborts_the_engine_call():
    """Proposers that take a while send no byte: comment lines keep the connection in use, clients skip them,
    and a client that leaves while only comments came still cancels the engine work."""
    engines = {SMALL: ScriptedEngine(SMALL, delay_s=1.0), QWEN_SMALL: ScriptedEngine(QWEN_SMALL)}
    pipeline = Pipeline("p", (Propose(models=(SMALL,)), Aggregate(model=QWEN_SMALL)))
    app = create_app(load_registry(), models=[], pipelines={"p": pipeline}, engines=engines,
                     settings=ServerSettings(keepalive_s=0.2))
    body = {"model": "p", "messages": Q, "seed": 1, "stream": True}
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line]
        first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
        assert first_data >= 3 and set(lines[:first_data]) == {": keep-alive"}, lines
        assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines[first_data:])
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in
                           (json.loads(line.removeprefix("data: ")) for line in lines[first_data:-1]) if c["choices"])
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        parsed = await client.chat.completions.create(model="p", messages=Q, seed=1, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in parsed if c.choices]) == streamed != ""

        engines[SMALL].delay_s = 30.0
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line == ": keep-alive":
                    break  # leave while the proposer is still at work
        for _ in range(50):
            if engines[SMALL].calls[-1].aborted and app.state.moa.semaphore._value == ServerSettings().max_concurrency:
                break
            await asyncio.sleep(0.1)
        assert engines[SMALL].calls[-1].aborted and not engines[SMALL].calls[-1].finished
        assert app.state.moa.semaphore._value == ServerSettings().max_concurrency  # the slot came back


def _check(model: str, agreed: int) -> CheckResult:
    """A known-answer result as the pool records it: 20 decisive tokens, `agreed` of them right in both views."""
    case = CaseResult("p", positions=32, decisive=20, agreed=agreed, agreed_all=agreed, first_disagreement=None,
                      decode_decisive=20, decode_agreed=agreed)
    return CheckResult(model, "bfloat16", "test cpu", [case])


async def test_a_model_that_failed_its_known_answer_check_is_not_served_unless_its_entry_accepts_it():
    registry = load_registry()
    engines = {SMALL: ScriptedEngine(SMALL), QWEN_SMALL: ScriptedEngine(QWEN_SMALL)}
    pipeline = Pipeline("p", (Propose(models=(SMALL,)), Aggregate(model=QWEN_SMALL)))
    app = create_app(registry, models=[SMALL, QWEN_SMALL], pipelines={"p": pipeline}, engines=engines)
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        state = app.state.moa
        state.checks = {SMALL: _check(SMALL, 20), QWEN_SMALL: _check(QWEN_SMALL, 20)}
        assert (await http.get("/ready")).status_code == 200
        state.checks[SMALL] = _check(SMALL, 5)  # 25%: its answers are not the model's
        ready = await http.get("/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "known_answer_failed"
        assert SMALL in ready.json()["error"]["message"] and QWEN_SMALL not in ready.json()["error"]["message"]
        assert ready.json()["known_answer_checks"][SMALL]["ok"] is False
        listed = {e["id"]: e["moa"] for e in (await http.get("/v1/models")).json()["data"]}
        assert listed[SMALL]["ready"] is False and listed[SMALL]["blocked"] == "known_answer_failed"
        assert listed["p"]["ready"] is False and listed[QWEN_SMALL]["ready"] is True
        calls = len(engines[SMALL].calls)
        for body in ({"model": SMALL}, {"model": "p"}, {"model": QWEN_SMALL, "stream": True,
                                                        "moa": {}}, {"model": "p", "stream": True}):
            r = await http.post("/v1/chat/completions", json={"messages": Q, **body})
            if body["model"] == QWEN_SMALL:  # its own check passed: served
                assert r.status_code == 200, r.text
                continue
            assert r.status_code == 503 and r.json()["error"]["code"] == "known_answer_failed", body
            assert "known_answer: warn" in r.json()["error"]["message"]
        overridden = await http.post("/v1/chat/completions", json={
            "model": "p", "messages": Q, "moa": {"proposers": [QWEN_SMALL], "aggregator": QWEN_SMALL}})
        assert overridden.status_code == 200  # the request's own pipeline does not need the failed model
        text = await http.post("/v1/completions", json={"model": SMALL, "prompt": "2 + 2 ="})
        assert text.status_code == 503
        assert len(engines[SMALL].calls) == calls  # refused before any engine call
        # Accepted knowingly in models.yaml: served, and /ready still shows the failure.
        state.registry.models[SMALL] = registry.get(SMALL).model_copy(update={"known_answer": "warn"})
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["known_answer_checks"][SMALL]["ok"] is False
        assert (await http.post("/v1/chat/completions", json={"model": "p", "messages": Q})).status_code == 200


async def test_a_stream_that_times_out_while_its_client_reads_slowly_still_ends_with_its_timeout_event():
    """The request timeout (an `asyncio.timeout` inside the stream's generator) must land inside that generator
    even when the reader is slower than the writer; before, it could land while the keep-alive wrapper's
    producer waited to hand over a chunk, closing the stream as if the client had left, with no [DONE]."""
    from serving.api.delivery import _kept_alive

    ended: list[str] = []

    async def events():  # the shape of delivery._events: chunks under a timeout, its event, then [DONE]
        try:
            async with asyncio.timeout(0.3):
                for i in range(10_000):  # a chunk a millisecond: ~300 before the timeout
                    await asyncio.sleep(0.001)
                    yield f"chunk {i}"
        except TimeoutError:
            ended.append("timeout")
            yield "504"
        except GeneratorExit:
            ended.append("client gone")
            raise
        yield "[DONE]"

    received = []
    async with asyncio.timeout(10):
        async for item in _kept_alive(events(), every_s=5.0):
            received.append(item)
            await asyncio.sleep(0.005)  # a slow reader
    assert ended == ["timeout"] and received[-2:] == ["504", "[DONE]"], (ended, received[-3:])


async def test_each_target_answers_as_soon_as_its_engines_are_up_and_the_rest_say_what_they_wait_for():
    """Serve as you go: while the second engine starts, the first model answers, a pipeline that needs the
    second gets a 503 with Retry-After naming it, and /ready (whole) stays 503 until every engine is up.
    The engines come up here by hand, in the order the pool would start them."""
    from contextlib import asynccontextmanager
    from types import SimpleNamespace

    registry = load_registry()
    engines = {SMALL: ScriptedEngine(SMALL), QWEN_SMALL: ScriptedEngine(QWEN_SMALL)}
    pipeline = Pipeline("p", (Propose(models=(SMALL,)), Aggregate(model=QWEN_SMALL)))
    app = create_app(registry, models=[SMALL], pipelines={"p": pipeline})
    state = app.state.moa
    pool = SimpleNamespace(starting=SMALL)

    @asynccontextmanager
    async def starting_by_hand(app):
        state.pool, state.engines = pool, engines
        yield

    app.router.lifespan_context = starting_by_hand
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        assert state.models == [SMALL, QWEN_SMALL]  # the start order: the named model first
        nothing = await http.post("/v1/chat/completions", json={"model": SMALL, "messages": Q})
        assert nothing.status_code == 503 and nothing.headers["retry-after"] == "10"
        assert f"{SMALL} (starting, engine 1 of 2)" in nothing.json()["error"]["message"]

        state.up.append(SMALL)  # the first engine is up; the second starts
        pool.starting = QWEN_SMALL
        answered = await http.post("/v1/chat/completions", json={"model": SMALL, "messages": Q})
        assert answered.status_code == 200, answered.text
        for body in ({"model": "p"}, {"model": "p", "stream": True}, {"model": QWEN_SMALL}):
            waits = await http.post("/v1/chat/completions", json={"messages": Q, **body})
            assert waits.status_code == 503 and waits.headers["retry-after"] == "10", body
            error = waits.json()["error"]
            assert error["code"] == "model_loading" and f"{QWEN_SMALL} (starting, engine 2 of 2)" in error["message"]
        overridden = await http.post("/v1/chat/completions", json={  # a request's own pipeline may need only SMALL
            "model": "p", "messages": Q, "moa": {"aggregator": SMALL}})
        assert overridden.status_code == 200, overridden.text
        assert (await http.post("/v1/chat/completions", json={  # ... or name the model still starting
            "model": SMALL, "messages": Q})).status_code == 200
        assert len(engines[QWEN_SMALL].calls) == 0  # nothing reached the engine still starting
        whole = await http.get("/ready")
        assert whole.status_code == 503 and whole.json()["engines"] == {SMALL: "up", QWEN_SMALL: "starting"}
        assert (await http.get("/ready", params={"target": SMALL})).status_code == 200
        assert (await http.get("/ready", params={"target": "p"})).status_code == 503
        assert (await http.get("/ready", params={"target": "nope"})).status_code == 404
        listed = {e["id"]: e["moa"] for e in (await http.get("/v1/models")).json()["data"]}
        assert listed[SMALL]["ready"] is True and listed["p"] == {**listed["p"], "ready": False,
                                                                 "waiting_for": [QWEN_SMALL]}

        state.up.append(QWEN_SMALL)
        pool.starting, state.ready = None, True
        assert (await http.get("/ready")).status_code == 200
        assert (await http.get("/ready", params={"target": "p"})).status_code == 200
        assert (await http.post("/v1/chat/completions", json={"model": "p", "messages": Q})).status_code == 200

        state.start_error = "RuntimeError: no weights"  # a start that failed closes every engine: nothing served
        state.up.clear()
        failed = await http.post("/v1/chat/completions", json={"model": SMALL, "messages": Q})
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "engines_failed"
        assert "no weights" in failed.json()["error"]["message"] and "retry-after" not in failed.headers


async def test_the_server_starts_its_own_engines_one_by_one_and_answers_each_model_once_it_is_up(monkeypatch):
    """The real lifespan and engine pool, with scripted engines (the real-engine version is in test_faults): the
    second engine's start is held back; meanwhile the first answers and the pipeline says what it waits for."""
    from serving.engines import pool as pool_module

    gate, closed = asyncio.Event(), []

    class Engine(ScriptedEngine):
        async def start(self) -> None:
            if self.name == QWEN_SMALL:
                await gate.wait()  # an engine still loading its weights

        async def close(self) -> None:
            closed.append(self.name)

    checked = asyncio.Event()

    async def held_check(spec, engine):  # scripted engines have no float32 reference to agree with
        if spec.name == SMALL:
            await checked.wait()  # the known-answer check of an engine that has started
        return None

    monkeypatch.setattr(pool_module, "create_engine", lambda spec, **placement: Engine(spec.name))
    monkeypatch.setattr(pool_module, "verify", held_check)
    progress: list[str] = []
    pipeline = Pipeline("p", (Propose(models=(SMALL,)), Aggregate(model=QWEN_SMALL)))
    app = create_app(load_registry(), models=[SMALL], pipelines={"p": pipeline}, on_progress=progress.append)
    state = app.state.moa
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        await until(lambda: SMALL in state.engines)
        checking = await http.post("/v1/chat/completions", json={"model": SMALL, "messages": Q})
        assert checking.status_code == 503 and state.up == []  # started, but not served before its verdict
        assert len(state.engines[SMALL].calls) == 0
        checked.set()
        await until(lambda: state.up == [SMALL])
        assert state.up == [SMALL] and state.pool.starting == QWEN_SMALL
        assert (await http.post("/v1/chat/completions", json={"model": SMALL, "messages": Q})).status_code == 200
        waits = await http.post("/v1/chat/completions", json={"model": "p", "messages": Q})
        assert waits.status_code == 503
        assert f"{QWEN_SMALL} (starting, engine 2 of 2)" in waits.json()["error"]["message"]
        assert (await http.get("/ready")).json()["engines"] == {SMALL: "up", QWEN_SMALL: "starting"}
        gate.set()
        await until(lambda: state.ready)
        assert (await http.get("/ready")).status_code == 200
        assert (await http.post("/v1/chat/completions", json={"model": "p", "messages": Q})).status_code == 200
    assert progress[0] == f"engine 1 of 2: starting {SMALL}" and progress[2] == f"engine 2 of 2: starting {QWEN_SMALL}"
    assert progress[1].startswith(f"engine 1 of 2: {SMALL} up in ") and len(progress) == 5
    assert progress[4].startswith("all 2 engines up")
    assert sorted(closed) == sorted([SMALL, QWEN_SMALL]) and state.up == []  # shut down: every engine closed


async def test_an_engine_that_fails_to_start_stops_the_server_serving_and_every_request_says_why(monkeypatch):
    from serving.engines import pool as pool_module

    class Engine(ScriptedEngine):
        async def start(self) -> None:
            if self.name == QWEN_SMALL:
                raise RuntimeError("out of memory while loading the weights (injected)")

    monkeypatch.setattr(pool_module, "create_engine", lambda spec, **placement: Engine(spec.name))
    app = create_app(load_registry(), models=[SMALL, QWEN_SMALL], pipelines={})
    state = app.state.moa
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        await until(lambda: state.start_error)
        for model in (SMALL, QWEN_SMALL):  # the one that was up is closed too: a half-started server serves nothing
            r = await http.post("/v1/chat/completions", json={"model": model, "messages": Q})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engines_failed", r.text
            assert "out of memory while loading" in r.json()["error"]["message"]
        ready = await http.get("/ready")
        assert ready.status_code == 503 and ready.json()["engines"] == {SMALL: "failed", QWEN_SMALL: "failed"}


def test_an_engine_refusal_names_the_parameter_at_fault():
    """A speculating CPU engine refuses a sampled request: the 400 says `temperature`, not the default field."""
    from moa.engine import InvalidRequest, SamplingParams
    from serving.api.errors import APIError
    from serving.api.targets import _validate

    class Refusing:
        def __init__(self, exc):
            self.exc = exc

        def validate_request(self, prompt, params):
            raise self.exc

    with pytest.raises(APIError) as caught:
        _validate(Refusing(InvalidRequest("samples garbage here", param="temperature")), [], SamplingParams())
    assert caught.value.status == 400 and caught.value.param == "temperature"
    with pytest.raises(APIError) as caught:
        _validate(Refusing(InvalidRequest("beyond the context")), [], SamplingParams())
    assert caught.value.param == "max_tokens"
