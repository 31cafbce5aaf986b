"""Keys, body limit, rate limits and /metrics access, on a real HTTP server (no engine needed: the app stays
'starting', so a request that passes every check answers 503)."""

from __future__ import annotations

import math
import time
from contextlib import asynccontextmanager

import httpx

from serving.api.access import RateLimiter, accepted
from serving.api.app import ServerSettings, create_app
from serving.models.registry import load_registry
from tests.conftest import SMALL, uvicorn_serving

BODY = {"model": SMALL, "messages": [{"role": "user", "content": "hi"}]}


@asynccontextmanager
async def _idle(app):
    yield


@asynccontextmanager
async def starting_app(settings: ServerSettings):
    app = create_app(load_registry(), models=[SMALL], pipelines={}, settings=settings)
    app.router.lifespan_context = _idle  # no engines: /v1 requests that pass the guard get 503 "starting"
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        yield app, http


@asynccontextmanager
async def starting_server(settings: ServerSettings):
    async with starting_app(settings) as (_, http):
        yield http


class Clock:
    """time.time() under the test's control: the `limits` library reads the wall clock."""

    def __init__(self) -> None:
        self.now = 1_000_003.25  # not on a window boundary (the library names a 0 s wait exactly there)

    def __call__(self) -> float:
        return self.now


def test_keys_are_compared_whole():
    assert accepted("k2", ["k1", "k2"]) and not accepted("k", ["k1"]) and not accepted(None, ["k1"])
    assert not accepted("k1x", ["k1"]) and not accepted("", ["k1"])


def test_a_burst_then_the_rate_and_a_retry_at_retry_after_passes(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    limiter = RateLimiter(per_minute=6, burst=2)  # 2 requests per 20 s window
    assert limiter.take("a") is None and limiter.take("a") is None
    wait = limiter.take("a")
    assert wait is not None and 0 < wait <= 20
    assert limiter.take("b") is None  # another key, its own allowance
    clock.now += wait - 0.5
    assert limiter.take("a") is not None  # not yet
    clock.now += math.ceil(wait) - (wait - 0.5)
    assert limiter.take("a") is None  # after the whole seconds Retry-After names
    allowed = 0
    for _ in range(600):  # ten minutes at one request a second: the long-run rate is 6 a minute
        clock.now += 1
        allowed += limiter.take("c") is None
    assert 60 <= allowed <= 62


def test_idle_keys_leave_the_table(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    limiter = RateLimiter(per_minute=120, burst=2)  # a 1 s window: a key's counters go 2 s after its last hit
    for i in range(300):
        limiter.take(f"client-{i}")
    assert len(limiter) == 300
    clock.now += 3
    limiter.take("late")  # the storage sweeps expired counters (in its timer thread) after a hit
    deadline = time.monotonic() + 5
    while len(limiter) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(limiter) == 1

async def test_a_key_guards_the_api_and_metrics_unless_metrics_are_public():
    async with starting_server(ServerSettings(api_keys=["secret"])) as http:
        assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 401
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert (await http.get("/metrics", headers={"Authorization": "Bearer secret"})).status_code == 200
        ok = await http.post("/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 503  # past the guard: the engines are "starting"
        assert (await http.get("/health")).status_code == 200  # liveness stays open
    async with starting_server(ServerSettings(api_keys=["secret"], metrics_public=True)) as http:
        assert (await http.get("/metrics")).status_code == 200


async def test_a_chunked_body_is_cut_at_the_limit_while_it_arrives():
    async def chunks(n: int):
        for _ in range(n):
            yield b"x" * 1024

    async with starting_server(ServerSettings(max_body_bytes=8 * 1024)) as http:
        big = await http.post("/v1/chat/completions", content=chunks(64), headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and "more than 8192 bytes arrived" in big.json()["error"]["message"]
        declared = await http.post("/v1/chat/completions", content=b"x" * 9000)
        assert declared.status_code == 413 and "9000 bytes declared" in declared.json()["error"]["message"]
        small = await http.post("/v1/chat/completions", json=BODY)
        assert small.status_code == 503  # under the limit: read, replayed to the app, past the guard


async def test_each_key_gets_its_own_limit_and_429_says_when_to_retry(monkeypatch):
    monkeypatch.setattr(time, "time", Clock())  # no window boundary mid-test (it would allow one more)
    settings = ServerSettings(api_keys=["a", "b"], rate_limit_per_minute=1, rate_limit_burst=2)  # 2 per 120 s
    async with starting_app(settings) as (app, http):
        as_a, as_b = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
        for n in range(20):  # unknown keys are refused before the limiter: no counter, no allowance used
            wrong = await http.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer x{n}"})
            assert wrong.status_code == 401
        assert len(app.state.limiter) == 0
        codes = [(await http.post("/v1/chat/completions", json=BODY, headers=as_a)).status_code for _ in range(3)]
        assert codes == [503, 503, 429]
        refused = await http.post("/v1/chat/completions", json=BODY, headers=as_a)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 120
        assert (await http.post("/v1/chat/completions", json=BODY, headers=as_b)).status_code == 503
        assert (await http.get("/v1/models", headers=as_a)).status_code == 200  # reads are not counted


async def test_without_keys_a_new_bearer_string_buys_no_new_allowance(monkeypatch):
    """Issue 25 item 7: without keys the limit is the client address's; the header is not a key."""
    monkeypatch.setattr(time, "time", Clock())  # no window boundary mid-test (it would allow one more)
    settings = ServerSettings(rate_limit_per_minute=1, rate_limit_burst=2)
    async with starting_app(settings) as (app, http):
        codes = [(await http.post("/v1/chat/completions", json=BODY,
                                  headers={"Authorization": f"Bearer made-up-{n}"})).status_code for n in range(30)]
        assert codes == [503, 503] + [429] * 28
        assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 429  # no header: the same
        assert len(app.state.limiter) == 1  # one address, one counter: the table did not grow per string


async def test_framework_errors_are_in_openais_shape_and_the_schema_states_the_limits():
    async with starting_server(ServerSettings()) as http:
        as_json = {"Content-Type": "application/json"}
        broken = await http.post("/v1/chat/completions", content=b"{not json", headers=as_json)
        assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
        garbled = await http.post("/v1/chat/completions", content=b"\xff\xfe\x0b", headers=as_json)  # not UTF-8
        assert garbled.status_code == 400 and garbled.json()["error"]["code"] == "invalid_json"
        assert (await http.get("/v1/nowhere")).json()["error"]["type"] == "not_found_error"
        assert (await http.put("/v1/chat/completions")).status_code == 405
        schema = (await http.get("/openapi.json")).json()
        stop = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]["stop"]
        assert '"minLength": 1' in str(stop).replace("'", '"') and '"maxItems": 4' in str(stop).replace("'", '"')
        empty_stop = await http.post("/v1/chat/completions", json={**BODY, "stop": [""]})
        assert empty_stop.status_code == 400 and empty_stop.json()["error"]["param"].startswith("stop")
