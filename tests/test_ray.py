"""Engines in Ray actors on a local two-node Ray cluster (`ray.cluster_utils.Cluster`), real vLLM CPU engines.

Each simulated node carries its own custom resource; each model is pinned to one node by it.
"""

from __future__ import annotations

import asyncio

import pytest
import yaml

from moa.engine import Delta, EngineError, Generation, SamplingParams
from moa.pipeline import Pipeline
from moa.runner import run
from moa.steps import Aggregate, Propose
from serving.engines.pool import EnginePool
from serving.models.registry import load_registry
from serving.models.store import resolve
from tests.conftest import COUNT, FRANCE, QWEN_SMALL, SMALL

pytestmark = pytest.mark.vllm
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1}})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def ray_registry(tmp_path_factory, registry, local_model):
    """The embedded SmolLM2 twice, each copy pinned to one node, plus the in-process Qwen-0.5B."""
    path = resolve(local_model(SMALL)).path
    local_model(QWEN_SMALL)
    config = tmp_path_factory.mktemp("ray") / "models.yaml"

    def pinned(node: str, core: int) -> dict:
        return {"backend": "vllm", "placement": "ray", "source": {"kind": "hf-dir", "path": str(path)},
                "engine": {"dtype": "auto", "max_model_len": 4096, "cpu_kv_cache_gib": 0.25},
                "ray": {"resources": {node: 1}, "env": {"VLLM_CPU_OMP_THREADS_BIND": str(core)}}}

    qwen = registry.get(QWEN_SMALL).model_dump(mode="json", exclude={"name"}, exclude_defaults=True)
    config.write_text(yaml.safe_dump({"default_model": "smol-a", "models": {
        "smol-a": pinned("node_a", 0), "smol-b": pinned("node_b", 1), QWEN_SMALL: qwen}}))
    return load_registry(config)


@pytest.fixture(scope="module")
async def ray_pool(cluster, ray_registry):
    async with EnginePool(ray_registry, ["smol-a", "smol-b"]) as pool:
        yield pool


async def test_each_engine_lands_on_its_node(cluster, ray_pool):
    nodes = {n.node_id: n for n in cluster.list_all_nodes()}
    a, b = ray_pool["smol-a"].node["node_id"], ray_pool["smol-b"].node["node_id"]
    assert a != b and {a, b} == set(nodes)
    assert nodes[a].node_id == cluster.head_node.node_id  # node_a is the head's resource


async def test_streaming_and_n_k_through_the_actor(ray_pool):
    engine = ray_pool["smol-a"]
    requests = engine.stats.started
    texts = {0: "", 1: "", 2: ""}
    final = None
    async for event in engine.stream(FRANCE, SamplingParams(n=3, temperature=0.8, max_tokens=16, seed=3)):
        if isinstance(event, Delta):
            texts[event.index] += event.text
        else:
            final = event
    assert isinstance(final, Generation) and [texts[i] for i in range(3)] == final.texts
    assert engine.stats.started == requests + 1  # n=3 is one request to the actor, one to vLLM
    greedy = SamplingParams(temperature=0, max_tokens=16)
    assert (await engine.generate(FRANCE, greedy)).texts == (await ray_pool["smol-b"].generate(FRANCE, greedy)).texts


async def test_health_lists_each_engine_with_its_node(ray_registry, ray_pool):
    import httpx

    from serving.api.app import create_app
    from tests.conftest import uvicorn_serving

    app = create_app(ray_registry, models=["smol-a", "smol-b"], pipelines={}, engines=ray_pool.engines)
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        engines = (await http.get("/health")).json()["engines"]
        # Beyond the context: a 400 before any byte of the stream, checked on this side (the actor's
        # tokenizer is the model's own, loaded here too).
        too_long = await http.post("/v1/chat/completions", json={"model": "smol-a", "messages": FRANCE,
                                                                "max_tokens": 5000, "stream": True})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens", too_long.text
        assert "context length 4096" in too_long.json()["error"]["message"]
        assert (await http.get("/ready")).status_code == 200
    assert {name: e["placement"] for name, e in engines.items()} == {"smol-a": "ray", "smol-b": "ray"}
    assert engines["smol-a"]["node_id"] == ray_pool["smol-a"].node["node_id"] != engines["smol-b"]["node_id"]


async def test_a_pipeline_mixing_ray_and_in_process_engines(ray_pool, small_pool):
    pipeline = Pipeline("mixed", (Propose(models=("smol-a", "smol-b", QWEN_SMALL), max_tokens=12),
                                  Aggregate(model=QWEN_SMALL, max_tokens=12)))
    engines = {**ray_pool.engines, QWEN_SMALL: small_pool[QWEN_SMALL]}  # the shared in-process engine
    result = await run(pipeline, FRANCE, engines, seed=1)
    assert [(c.model, c.status) for c in result.trace.calls][:3] == [("smol-a", "ok"), ("smol-b", "ok"),
                                                                     (QWEN_SMALL, "ok")]
    assert result.answer and result.usage.engine_calls == 4


async def test_disconnect_aborts_inside_both_actors(ray_pool):
    started = asyncio.Event()

    async def consume(engine):
        async for event in engine.stream(COUNT, SamplingParams(temperature=0, max_tokens=2000)):
            if isinstance(event, Delta) and event.text:
                started.set()

    tasks = [asyncio.create_task(consume(ray_pool[name])) for name in ("smol-a", "smol-b")]
    await asyncio.wait_for(started.wait(), 60)
    await asyncio.sleep(0.5)
    assert sum([await ray_pool[name].running_requests() for name in ("smol-a", "smol-b")]) >= 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(50):
        running = [await ray_pool[name].running_requests() for name in ("smol-a", "smol-b")]
        if running == [0, 0]:
            break
        await asyncio.sleep(0.2)
    assert running == [0, 0]


async def test_a_killed_actor_is_restarted_and_serves_again(ray_pool):
    import psutil

    engine = ray_pool["smol-b"]
    before, old_cores = engine.node["pid"], engine.node["core_pids"]
    greedy = SamplingParams(temperature=0, max_tokens=8)
    expected = (await engine.generate(FRANCE, greedy)).texts
    assert engine.state == "ready"
    ray.kill(engine._actor, no_restart=False)
    for _ in range(100):  # the probe sees it go: /ready is 503 before any request has failed
        if engine.state == "restarting":
            break
        await asyncio.sleep(0.1)
    assert engine.state == "restarting"
    failures = 0
    for _ in range(240):
        try:
            result = await engine.generate(FRANCE, greedy)
            break
        except EngineError:
            failures += 1
            await asyncio.sleep(0.5)
    else:
        pytest.fail("the actor did not come back")
    assert result.texts == expected and (await engine.describe())["pid"] != before
    assert failures >= 1  # requests during the restart failed as engine errors, not hangs
    for _ in range(100):
        if engine.state == "ready":
            break
        await asyncio.sleep(0.1)
    assert engine.state == "ready"
    alive = [p for p in old_cores if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []  # the killed actor's EngineCore went with it


def test_moa_plan_shows_the_nodes_each_engine_can_land_on(cluster, ray_registry):
    import json
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "serving.cli", "plan", "-c", str(ray_registry.path), "-m", "smol-a",
                          "-m", "smol-b", "--ray-address", cluster.address, "--json"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "MOA_VERBOSE": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    placed = json.loads(out.stdout)["ray"]
    assert placed["smol-a"]["demand"] == {"CPU": 1.0, "node_a": 1.0}
    assert [len(placed[m]["nodes"]) for m in ("smol-a", "smol-b")] == [1, 1]
    assert "node_a 1" in placed["smol-a"]["nodes"][0] and "node_b 1" in placed["smol-b"]["nodes"][0]
