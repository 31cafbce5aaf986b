"""Fault injection on real engines: an engine's processes are killed mid-request (SIGKILL, as the OOM killer
would), and what the client gets is checked — degraded but answered, the fallback, or a clean error — and
that the engine comes back for the next request."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import psutil
import pytest

from moa.engine import EngineError, SamplingParams
from moa.pipeline import Pipeline
from moa.runner import RunResult, iter_run
from moa.steps import Aggregate, Propose
from moa.trace import AnswerDelta, AnswerRestarted
from serving.api.app import ServerSettings, create_app
from tests.conftest import FRANCE, QWEN_SMALL, SMALL, uvicorn_serving

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
async def served(registry, local_model):
    """Engines of their own (the ones these tests kill are not the ones other modules share), started the way
    `moa serve` starts them: by the server, one by one, SMALL first. What the server answered while the second
    engine was still starting is kept for the test of that (one start of two engines serves both purposes)."""
    local_model(SMALL)
    local_model(QWEN_SMALL)
    pipeline = Pipeline("p", (Propose(models=(SMALL,)), Aggregate(model=QWEN_SMALL)))
    progress: list[str] = []
    app = create_app(registry, models=[SMALL], pipelines={"p": pipeline}, on_progress=progress.append)
    state = app.state.moa
    seen: dict = {"progress": progress}
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=300) as http:
        await until(lambda: SMALL in state.up, 900)
        seen["starting"] = state.pool.starting
        seen["model"] = await http.post("/v1/chat/completions", json={
            "model": SMALL, "messages": FRANCE, "max_tokens": 8, "temperature": 0})
        seen["pipeline"] = await http.post("/v1/chat/completions", json={"model": "p", "messages": FRANCE})
        seen["ready_model"] = await http.get("/ready", params={"target": SMALL})
        seen["ready_pipeline"] = await http.get("/ready", params={"target": "p"})
        seen["ready"] = await http.get("/ready")
        seen["still_starting"] = state.pool.starting  # the second engine was starting throughout
        await until(lambda: state.ready, 900)
        seen["pipeline_once_up"] = await http.post("/v1/chat/completions", json={
            "model": "p", "messages": FRANCE, "max_tokens": 16})
        yield state.engines, seen


@pytest.fixture(scope="module")
def pool(served):
    return served[0]


async def test_the_server_answers_the_model_that_is_up_while_the_next_engine_starts(served):
    """Serve as you go, on real engines: the first model answers while the second engine starts; the pipeline
    that needs the second is a 503 with Retry-After naming it; /ready?target= says each; /ready waits for all."""
    _, seen = served
    assert seen["starting"] == seen["still_starting"] == QWEN_SMALL
    assert seen["model"].status_code == 200 and seen["model"].json()["choices"][0]["message"]["content"]
    waits = seen["pipeline"]
    assert waits.status_code == 503 and waits.headers["retry-after"] == "10"
    assert waits.json()["error"]["code"] == "model_loading" and f"{QWEN_SMALL} (starting" in waits.text
    assert seen["ready_model"].status_code == 200 and seen["ready_pipeline"].status_code == 503
    assert seen["ready"].status_code == 503 and seen["ready"].json()["engines"] == {SMALL: "up", QWEN_SMALL: "starting"}
    assert seen["pipeline_once_up"].status_code == 200, seen["pipeline_once_up"].text
    assert [line.split(":")[0] for line in seen["progress"]] == ["engine 1 of 2", "engine 1 of 2", "engine 2 of 2",
                                                                 "engine 2 of 2", "all 2 engines up"]
    assert f"{SMALL} up in" in seen["progress"][1] and f"{QWEN_SMALL} up in" in seen["progress"][3]
ESSAY = [{"role": "user", "content": "Write a long, detailed essay about the history of Paris."}]


def kill_engine(engine) -> None:
    """SIGKILL every process the engine spawned (its EngineCore and workers)."""
    for pid in engine.core_pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


async def until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


async def test_a_proposer_killed_mid_pipeline_degrades_the_answer_then_comes_back(pool):
    small, qwen = pool[SMALL], pool[QWEN_SMALL]
    pipeline = Pipeline("degrade", (Propose(models=(SMALL, QWEN_SMALL), max_tokens=200, temperature=0.0),
                                    Aggregate(model=QWEN_SMALL, max_tokens=16)))
    run = asyncio.create_task(_result(iter_run(pipeline, ESSAY, pool, seed=1)))
    await until(lambda: small.stats.running > 0)
    await asyncio.sleep(0.5)  # it is decoding
    kill_engine(small)
    result = await asyncio.wait_for(run, 120)
    statuses = {c.model: c.status for c in result.trace.calls if c.step == "propose"}
    assert statuses == {SMALL: "error", QWEN_SMALL: "ok"}, [c.error for c in result.trace.calls]
    assert result.answer.strip() and len(result.responses[0]) == 1  # min_success 1: answered from one proposal
    failed = next(c for c in result.trace.calls if c.model == SMALL)
    assert SMALL in failed.error or "Engine" in failed.error, failed.error
    restarts = small.stats.restarts
    whole = await asyncio.wait_for(_result(iter_run(pipeline, FRANCE, pool, seed=1)), 180)
    assert len(whole.responses[0]) == 2 and small.stats.restarts == restarts + 1 and qwen.state == "ready"


async def test_an_aggregator_killed_while_streaming_restarts_the_answer_with_the_fallback(pool):
    qwen = pool[QWEN_SMALL]
    pipeline = Pipeline("fallback", (Propose(models=(SMALL,), max_tokens=24, temperature=0.0),
                                     Aggregate(model=QWEN_SMALL, max_tokens=300)))
    events, killed = [], False
    async for item in iter_run(pipeline, ESSAY, pool, seed=1):
        events.append(item)
        if isinstance(item, AnswerDelta) and item.text and not killed:
            kill_engine(qwen)
            killed = True
    result = events[-1]
    assert isinstance(result, RunResult) and killed
    assert result.answer == result.responses[0][0].text  # the proposal: the fault rules' fallback
    restart = next(e for e in events if isinstance(e, AnswerRestarted))
    after = events[events.index(restart) + 1:-1]
    assert "".join(e.text for e in after if isinstance(e, AnswerDelta)) == result.answer
    assert result.trace.calls[-1].status == "error" and "previous responses kept" in result.trace.steps[1].notes[-1]
    again = await asyncio.wait_for(_result(iter_run(pipeline, FRANCE, pool, seed=1)), 180)
    assert [c.status for c in again.trace.calls] == ["ok", "ok"] and qwen.state == "ready"


async def test_a_base_model_killed_mid_stream_ends_the_stream_with_an_error_event_not_a_hang(registry, pool):
    small = pool[SMALL]
    app = create_app(registry, models=[SMALL], pipelines={}, settings=ServerSettings(), engines=pool)
    body = {"model": SMALL, "messages": ESSAY, "max_tokens": 1000, "temperature": 0.0, "stream": True}
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        lines, killed = [], False
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line.removeprefix("data: "))
                    if not killed and len(lines) >= 3:
                        kill_engine(small)
                        killed = True
        assert lines[-1] == "[DONE]" and killed
        error = json.loads(lines[-2])["error"]
        assert error["type"] == "service_unavailable" and SMALL in error["message"], error
        assert (await http.get("/ready")).status_code == 503  # dead until the next request restarts it
        ok = await http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 8,
                                                           "messages": FRANCE})
        assert ok.status_code == 200 and (await http.get("/ready")).status_code == 200


async def _result(items) -> RunResult:
    async for item in items:
        if isinstance(item, RunResult):
            return item
    raise AssertionError("the run ended without a result")


async def test_two_engines_killed_together_restart_each_with_its_own_environment(pool):
    """Their restarts run at once, in two threads, and each sets its placement in os.environ for its EngineCore:
    each core must get its own (MOA_ENGINE names it) and the parent keep none of it."""
    import os

    from tests.test_placement import engine_core_env

    before = {k: os.environ.get(k) for k in ("MOA_ENGINE", "VLLM_CPU_OMP_THREADS_BIND")}
    binds = {name: engine_core_env(engine).get("VLLM_CPU_OMP_THREADS_BIND") for name, engine in pool.items()}
    for engine in pool.values():
        kill_engine(engine)
    await until(lambda: all(e.state == "dead" for e in pool.values()))
    answers = await asyncio.wait_for(asyncio.gather(
        *(engine.generate(FRANCE, SamplingParams(temperature=0, max_tokens=4)) for engine in pool.values())), 300)
    assert all(a.texts[0] for a in answers)
    for name, engine in pool.items():
        env = engine_core_env(engine)
        assert env["MOA_ENGINE"] == name and env.get("VLLM_CPU_OMP_THREADS_BIND") == binds[name], name
    assert {k: os.environ.get(k) for k in before} == before


async def test_a_restart_that_fails_is_tried_again_by_a_later_request(pool, monkeypatch):
    """Before: one failed restart left the engine 'not started' for good and /ready 503 forever."""
    small = pool[SMALL]
    real_build = small._build

    def broken() -> None:
        raise EngineError(f"model {SMALL!r}: vLLM could not start: out of memory (injected)")

    monkeypatch.setattr(small, "_build", broken)
    monkeypatch.setattr(small, "restart_retry_s", 3600.0)
    kill_engine(small)
    await until(lambda: small.state == "dead")
    params = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(EngineError, match="restarting it failed: .*out of memory"):
        await small.generate(FRANCE, params)
    assert small.state == "dead"  # not "stopped": /ready stays 503 until it is back
    with pytest.raises(EngineError, match=r"1 restart\(s\) failed.*next request in \d+ s"):
        await small.generate(FRANCE, params)  # within the wait: fails fast, no second build
    monkeypatch.setattr(small, "_build", real_build)
    monkeypatch.setattr(small, "restart_retry_s", 0.0)
    answer = await asyncio.wait_for(small.generate(FRANCE, params), 300)
    assert answer.texts[0] and small.state == "ready"
