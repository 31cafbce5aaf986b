"""The response cache on scripted engines: only a run whose trace proves its answer fixed is stored.

Sampled (temperature offsets, a cascade's samples), unseeded transforms, quorum cuts and runs with a failed,
timed-out, aborted or skipped call are answered but never stored; greedy and seeded runs are replayed.
The real-engine cache tests are in tests/test_server.py.
"""

from __future__ import annotations

import re
from dataclasses import replace

import httpx
import pytest

from moa.pipeline import Pipeline
from moa.steps import Adaptive, Aggregate, Propose
from moa.testing import ScriptedEngine
from moa.transform_steps import Dropout, Sample, Shuffle
from serving.api.app import ServerSettings, create_app
from serving.api.cache import DISK_BYTES_PER_ENTRY, ResponseCache
from serving.models.registry import load_registry
from tests.conftest import QWEN_SMALL, SMALL, uvicorn_serving

Q = [{"role": "user", "content": "What is 2 + 2?"}]
GREEDY = (Propose(models=(SMALL, QWEN_SMALL), temperature=0), Aggregate(model=QWEN_SMALL, temperature=0))


async def asked_twice(steps, engines: dict | None = None, **request) -> tuple[list[dict], list[int], str]:
    """One pipeline, asked the same thing twice: both bodies, the engine calls each made, and /metrics."""
    engines = engines or {}
    engines = {SMALL: engines.get(SMALL) or ScriptedEngine(SMALL),
               QWEN_SMALL: engines.get(QWEN_SMALL) or ScriptedEngine(QWEN_SMALL)}
    app = create_app(load_registry(), models=[SMALL], pipelines={"p": Pipeline("p", tuple(steps))},
                     settings=ServerSettings(cache_entries=8), engines=engines)
    bodies, calls = [], []
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(2):
            before = sum(len(e.calls) for e in engines.values())
            response = await http.post("/v1/chat/completions", json={"model": "p", "messages": Q, **request})
            assert response.status_code == 200, response.text
            bodies.append(response.json())
            calls.append(sum(len(e.calls) for e in engines.values()) - before)
        metrics = (await http.get("/metrics")).text
    return bodies, calls, metrics


def lookups(metrics: str, result: str) -> float:
    name = f'moa_cache_lookups_total{{result="{result}"}}'
    return float(next(line for line in metrics.splitlines() if line.startswith(name)).split()[-1])


async def test_a_greedy_pipeline_is_stored_and_replayed_without_its_trace_unless_asked():
    bodies, calls, metrics = await asked_twice(GREEDY)
    assert calls == [3, 0]
    first, again = bodies
    assert again["moa"]["cached"] is True and "cached" not in first["moa"]
    assert again["choices"] == first["choices"] and again["id"] != first["id"]
    assert "trace" not in first["moa"] and "trace" not in again["moa"]  # the check's trace is not answered
    assert (lookups(metrics, "hit"), lookups(metrics, "miss")) == (1, 1)
    traced, calls, _ = await asked_twice(GREEDY, moa={"trace": True})
    assert calls == [3, 0] and traced[1]["moa"]["trace"] == traced[0]["moa"]["trace"]
    assert [c["temperature"] for c in traced[0]["moa"]["trace"]["calls"]] == [0, 0, 0]


async def test_a_seeded_pipeline_is_stored_and_a_sampled_one_is_not():
    sampled = (Propose(models=(SMALL,), samples=2, temperature=0.7), Aggregate(model=QWEN_SMALL, temperature=0.7))
    assert (await asked_twice(sampled, seed=4))[1] == [2, 0]
    assert (await asked_twice(sampled))[1] == [2, 2]


async def test_temperature_offsets_sample_unless_seeded_or_clamped_to_greedy():
    offsets = (Propose(models=(SMALL,), samples=2, temperature=0, temperature_offsets=(0.0, 0.6)),
               Aggregate(model=QWEN_SMALL, temperature=0))
    assert (await asked_twice(offsets))[1] == [3, 3]  # the second sample ran at 0.6, unseeded
    assert (await asked_twice(offsets, seed=2))[1] == [3, 0]
    clamped = (Propose(models=(SMALL,), samples=2, temperature=0.3, temperature_offsets=(-0.3, -0.5)),
               Aggregate(model=QWEN_SMALL, temperature=0))
    assert (await asked_twice(clamped))[1] == [3, 0]  # both samples at max(0, t + offset) = 0: greedy


@pytest.mark.parametrize("transform", [Shuffle(), Sample(k=1), Dropout(rate=0.5)], ids=lambda s: s.kind)
async def test_an_unseeded_shuffle_sample_or_dropout_is_not_stored(transform):
    steps = (GREEDY[0], transform, GREEDY[1])
    assert (await asked_twice(steps))[1] == [3, 3]
    seeded = (GREEDY[0], replace(transform, seed=7), GREEDY[1])
    assert (await asked_twice(seeded))[1] == [3, 0]
    assert (await asked_twice(steps, seed=1))[1] == [3, 0]  # the request's seed seeds it


async def test_a_run_with_a_failed_call_is_answered_but_not_stored():
    bodies, calls, _ = await asked_twice(GREEDY, {SMALL: ScriptedEngine(SMALL, fail="out of memory")})
    assert calls == [3, 3] and bodies[0]["choices"][0]["message"]["content"] and "cached" not in bodies[1]["moa"]


async def test_a_run_with_a_timed_out_call_is_not_stored():
    steps = (Propose(models=(SMALL, QWEN_SMALL), temperature=0, timeout_s=0.2), GREEDY[1])
    bodies, calls, _ = await asked_twice(steps, {SMALL: ScriptedEngine(SMALL, delay_s=5)})
    assert calls == [3, 3] and "cached" not in bodies[1]["moa"]


async def test_a_run_whose_aggregator_the_spending_limit_skipped_is_not_stored():
    bodies, calls, _ = await asked_twice((Propose(models=(SMALL,), temperature=0), GREEDY[1]),
                                         moa={"max_total_tokens": 100, "trace": True})
    assert [c["status"] for c in bodies[0]["moa"]["trace"]["calls"]] == ["ok", "skipped"]
    assert calls == [1, 1]  # the skipped call never reached an engine, and nothing was stored


async def test_a_quorum_that_aborted_a_slower_call_is_not_stored():
    across = (Propose(models=(SMALL, QWEN_SMALL), temperature=0, quorum=1),)
    bodies, calls, _ = await asked_twice(across, {QWEN_SMALL: ScriptedEngine(QWEN_SMALL, delay_s=5)},
                                         moa={"trace": True})
    assert [c["status"] for c in bodies[0]["moa"]["trace"]["calls"]] == ["ok", "aborted"]
    assert calls == [2, 2]


async def test_a_quorum_that_cut_samples_inside_one_seeded_request_is_not_stored():
    within = (Propose(models=(SMALL,), samples=3, temperature=0.7, quorum=2),)  # one n=3 request, cut at 2
    assert (await asked_twice(within, seed=1))[1] == [1, 1]
    bodies, _, _ = await asked_twice(within, seed=1, moa={"trace": True})
    assert bodies[0]["moa"]["trace"]["calls"][0]["aborted_samples"] == 1


async def test_a_cascade_is_stored_when_it_stayed_greedy_and_not_when_it_sampled():
    adaptive = (Adaptive(model=SMALL, samples=2),)
    sure = ScriptedEngine(SMALL, min_logprob=-0.1)
    assert (await asked_twice(adaptive, {SMALL: sure}))[1] == [1, 0]
    unsure = ScriptedEngine(SMALL, min_logprob=-5.0)  # escalates: two unseeded samples at temperature 0.7
    assert (await asked_twice(adaptive, {SMALL: unsure}))[1] == [3, 3]  # and a synthesis: they disagree


def test_answers_on_disk_outlive_the_cache_and_are_shared_by_two_at_once(tmp_path):
    path = tmp_path / "answers"
    first, second = ResponseCache(8, path), ResponseCache(8, path)
    first.put("k", {"answer": 4})
    assert second.get("k") == {"answer": 4}  # another server on the same machine
    assert ResponseCache(8, path).get("k") == {"answer": 4} and path.is_dir()  # after a restart
    assert ResponseCache(8).get("k") is None


def test_the_disk_store_drops_the_least_recently_used_beyond_its_bytes(tmp_path):
    cache = ResponseCache(2, tmp_path / "answers")
    big = "x" * (DISK_BYTES_PER_ENTRY // 4)
    for i in range(40):
        cache.put(f"k{i}", {"text": big})
        cache.get("k0")  # kept in use
    fresh = ResponseCache(2, tmp_path / "answers")
    assert fresh.get("k0") is not None and fresh.get("k39") is not None and fresh.get("k1") is None
    assert len(fresh._disk) < 40 and fresh._disk.volume() < 2 * 2 * DISK_BYTES_PER_ENTRY


def test_a_cache_path_that_is_a_file_is_refused_by_name(tmp_path):
    old = tmp_path / "answers.sqlite"
    old.write_text("an older moa-stack's SQLite file")
    with pytest.raises(ValueError, match=re.escape(f"response cache {old}: this is a file")):
        ResponseCache(8, old)


def test_a_pipeline_that_runs_code_is_never_stored():
    """A check's verdict depends on its time limit under the machine's load, which no trace records."""
    from moa.steps import Check
    from serving.api.cache_policy import may_be_fixed

    assert may_be_fixed(Pipeline("greedy", GREEDY), seed=None)
    checked = Pipeline("checked", (Propose(models=(SMALL,), temperature=0), Check()))
    assert not may_be_fixed(checked, seed=None) and not may_be_fixed(checked, seed=3)


def test_a_locked_or_failing_disk_is_a_miss_and_a_kept_answer_not_a_failed_request(tmp_path, caplog):
    """Another server holding the SQLite lock, a full disk: before, the error became a 500 (after the engine work,
    for a write) or held the event loop for diskcache's default 60 s."""
    import diskcache

    cache = ResponseCache(4, tmp_path / "answers")
    assert cache._disk.timeout == 1.0
    cache.put("k", {"answer": 4})

    def locked(*args, **kwargs):
        raise diskcache.Timeout("database is locked")

    cache._disk.get = locked
    cache._disk.set = locked
    assert cache.get("k") == {"answer": 4}  # from memory
    assert cache.get("other") is None  # a miss, said in the log
    cache.put("new", {"answer": 5})  # kept in memory only
    assert cache.get("new") == {"answer": 5}
    locked = [r for r in caplog.records if "response cache" in r.message and "database is locked" in r.message]
    assert len(locked) == 4  # 3 reads, 1 write
