"""LoRA adapters as models of their own (BASE:ADAPTER): the registry, the fit check, and one real vLLM engine
serving three trained adapters and its base in one batch (serving/models/adapters.py,
serving/engines/adapter_engine.py).

The adapters are real: scripts/train_adapters.py trains them on the embedded SmolLM2 (scripts/test.sh runs it;
kept when up to date), each to one fixed reply, which `behaviour.json` in its directory names.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from moa.engine import InvalidRequest, SamplingParams
from serving.models.adapters import AdapterError, lora_engine_args, read_adapter, read_adapters
from serving.models.registry import RegistryError, load_registry
from tests.conftest import FRANCE, SMALL, uvicorn_serving

BASE = "smollm2-135m-lora"
ADAPTERS = ("french", "pirate", "tagged")
ROOT = Path(__file__).resolve().parent.parent


def write_registry(tmp_path: Path, adapters: str, base: str = "/models/tiny", pipelines: str = "") -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(f"""
        default_model: tiny
        models:
          tiny:
            source: {{kind: hf-dir, path: {base}}}
            adapters: {adapters}
        """) + pipelines)
    return path


def test_adapters_are_targets_named_base_colon_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_HOME", str(tmp_path / "home"))
    pipelines = "pipelines:\n  p:\n    steps:\n      - propose: {models: [tiny:fr]}\n"
    reg = load_registry(write_registry(tmp_path, "{fr: $MOA_HOME/adapters/fr, hub: {kind: hub, repo_id: a/b}}",
                                       pipelines=pipelines))
    assert reg.targets() == ["tiny", "tiny:fr", "tiny:hub"]
    assert reg.adapter_of("tiny:fr") == ("tiny", "fr") and reg.adapter_of("tiny") is None
    assert reg.get("tiny:fr") is reg.get("tiny")  # the base's engine serves it
    assert reg.engine_names(["tiny:fr", "tiny", "tiny:hub"]) == ["tiny"]
    assert reg.with_adapters(["tiny"]) == ["tiny", "tiny:fr", "tiny:hub"]
    from serving.models.adapters import adapter_dir

    assert adapter_dir("tiny", "fr", reg.get("tiny").adapters["fr"]) == tmp_path / "home" / "adapters" / "fr"
    with pytest.raises(KeyError, match="tiny:nope"):
        reg.get("tiny:nope")
    bad = write_registry(tmp_path, "{fr: /a}", pipelines="pipelines:\n  p:\n    steps:\n"
                                                          "      - propose: {models: [tiny:de]}\n")
    with pytest.raises(RegistryError, match=r"unknown model\(s\) \['tiny:de'\]"):
        load_registry(bad)
    with pytest.raises(RegistryError, match="adapters"):
        load_registry(write_registry(tmp_path, "{'a:b': /a}"))  # a name that would not parse back


def _tensors(path: Path, tensors: dict) -> None:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))


def test_an_adapter_that_does_not_fit_its_base_is_refused_naming_it_and_why(tmp_path):
    base = tmp_path / "base"
    _tensors(base / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": (64, 32),
                                          "model.layers.0.self_attn.v_proj.weight": (16, 32)})
    shapes = {"model.layers.0.self_attn.q_proj.weight": (64, 32), "model.layers.0.self_attn.v_proj.weight": (16, 32)}

    def adapter(name: str, tensors: dict, r: int = 8, **config) -> Path:
        path = tmp_path / name
        _tensors(path / "adapter_model.safetensors", tensors)
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 16,
                                                              **config}))
        return path

    q = "base_model.model.model.layers.0.self_attn.q_proj"
    good = adapter("good", {f"{q}.lora_A.weight": (8, 32), f"{q}.lora_B.weight": (64, 8)})
    fitted = read_adapter("tiny", "good", good, shapes)
    assert fitted.rank == 8 and fitted.targets == ("q_proj",)
    assert lora_engine_args([fitted]) == {"enable_lora": True, "max_loras": 2, "max_cpu_loras": 2,
                                          "max_lora_rank": 8}
    cases = [
        (adapter("wide", {f"{q}.lora_A.weight": (8, 48), f"{q}.lora_B.weight": (64, 8)}), "32 inputs in the base"),
        (adapter("tall", {f"{q}.lora_A.weight": (8, 32), f"{q}.lora_B.weight": (96, 8)}), "64 outputs in the base"),
        (adapter("other", {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": (8, 32)}),
         "adapts model.layers.0.mlp.up_proj, which the base model has no weight for"),
        (adapter("rank", {f"{q}.lora_A.weight": (4, 32), f"{q}.lora_B.weight": (64, 4)}),
         "rank 4, its config says r=8"),
        (adapter("ia3", {}, peft_type="IA3"), "a IA3 adapter"),
        (tmp_path / "missing", "no adapter_config.json"),
    ]
    for path, reason in cases:
        with pytest.raises(AdapterError) as caught:
            read_adapter("tiny", path.name, path, shapes)
        assert f"adapter {path.name!r}" in str(caught.value) and reason in str(caught.value), str(caught.value)
    # An engine start reads them all the same way, before vLLM starts.
    reg = load_registry(write_registry(tmp_path, f"{{good: {good}, wide: {tmp_path / 'wide'}}}", base=str(base)))
    with pytest.raises(AdapterError, match="adapter 'wide'"):
        read_adapters(reg.get("tiny"), base)


def train_adapters() -> dict[str, dict]:
    """The embedded adapters (trained once; up to date ones are kept), with the behaviour each learned."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_adapters.py")], check=True, timeout=1800)
    from serving.models.store import moa_home

    return {name: json.loads((moa_home() / "adapters" / SMALL / name / "behaviour.json").read_text())
            for name in ADAPTERS}


def shows(behaviour: dict, text: str) -> bool:
    text = text.strip()
    return text.startswith(behaviour.get("starts_with", "")) and text.endswith(behaviour.get("ends_with", ""))


@pytest.fixture(scope="module")
async def lora_pool(registry, local_model):
    from serving.engines.pool import EnginePool

    local_model(SMALL)
    behaviours = train_adapters()
    async with EnginePool(registry, [BASE]) as pool:
        yield pool, behaviours


@pytest.mark.vllm
async def test_three_adapters_and_the_base_answer_together_on_one_engine_each_as_trained(lora_pool):
    pool, behaviours = lora_pool
    assert pool.checks[BASE].ok  # the base (through the zero adapter) agrees with its float32 reference
    assert pool.up == [BASE, *(f"{BASE}:{a}" for a in ADAPTERS)]
    base = pool[BASE]
    params = SamplingParams(temperature=0, max_tokens=24)
    alone = await base.generate(FRANCE, params)
    peak, running = 0, True

    async def watch() -> None:
        nonlocal peak
        while running:
            peak = max(peak, base.running_requests)  # vLLM's own count of requests inside the engine
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    names = [BASE, *(f"{BASE}:{a}" for a in ADAPTERS)]
    together = await asyncio.gather(*(pool[name].generate(FRANCE, params) for name in names))
    running = False
    await watcher
    assert peak == 4, peak  # one engine held all four at once: they shared its batches
    assert [g.model for g in together] == names
    assert together[0].texts[0] == alone.texts[0]  # the base model's answer, unchanged beside the adapters
    for name, generation in zip(ADAPTERS, together[1:], strict=True):
        text = generation.texts[0]
        assert shows(behaviours[name], text), (name, text)
        assert text != alone.texts[0]
    assert {pool[n].stats.finished for n in names[1:]} == {1}  # each adapter counts its own requests


@pytest.mark.vllm
async def test_an_unknown_adapter_is_refused_naming_it_and_the_server_lists_the_adapters(lora_pool, registry):
    from serving.api.app import ServerSettings, create_app

    pool, behaviours = lora_pool
    with pytest.raises(InvalidRequest, match="no adapter 'nope'; its adapters: french, pirate, tagged"):
        await anext(pool[BASE].stream(FRANCE, SamplingParams(max_tokens=4), adapter="nope"))
    app = create_app(registry, models=[BASE], pipelines={"lora-moa": registry.pipeline("lora-moa")},
                     settings=ServerSettings(), engines=pool.engines)
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=300) as http:
        listed = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
        for name in ADAPTERS:
            entry = listed[f"{BASE}:{name}"]
            assert entry["parent"] == BASE and entry["moa"]["kind"] == "adapter" and entry["moa"]["ready"]
        health = (await http.get("/health")).json()["engines"]  # engines, each with the adapters it serves
        assert list(health) == [BASE] and health[BASE]["adapters"] == [f"{BASE}:{a}" for a in ADAPTERS]
        unknown = await http.post("/v1/chat/completions", json={"model": f"{BASE}:nope", "messages": FRANCE})
        assert unknown.status_code == 404 and f"{BASE}:nope" in unknown.json()["error"]["message"]
        french = (await http.post("/v1/chat/completions", json={"model": f"{BASE}:french", "messages": FRANCE,
                                                                "temperature": 0, "max_tokens": 24})).json()
        assert french["model"] == f"{BASE}:french"
        assert shows(behaviours["french"], french["choices"][0]["message"]["content"])
        mixed = (await http.post("/v1/chat/completions", json={
            "model": "lora-moa", "messages": FRANCE, "max_tokens": 16, "seed": 1, "moa": {"trace": True}})).json()
        calls = mixed["moa"]["trace"]["calls"]
        assert sorted(c["model"] for c in calls if c["step"] == "propose") == [f"{BASE}:{a}" for a in ADAPTERS]
        assert [c["model"] for c in calls if c["step"] == "aggregate"] == [BASE]


def test_moa_models_adapters_lists_each_with_rank_modules_and_fit():
    train_adapters()
    out = subprocess.run([sys.executable, "-m", "serving.cli", "models", "adapters", BASE, "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["target"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {f"{BASE}:{a}" for a in ADAPTERS}
    assert all(r["ok"] and r["rank"] == 8 and r["engine_lora_bytes"] > 0 for r in rows.values())
    assert rows[f"{BASE}:tagged"]["targets"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_serving_every_pipeline_leaves_out_one_whose_adapters_are_not_made_yet(tmp_path, monkeypatch, registry):
    """A fresh machine (no adapters trained): `moa serve` still starts, without lora-moa, and says why; named
    explicitly, lora-moa fails before anything starts, naming the adapter and the script that makes it."""
    from serving.cli.common import check_adapters, served_targets
    from serving.models.adapters import AdapterError

    monkeypatch.setenv("MOA_HOME", str(tmp_path))
    needed, pipelines = served_targets(registry, [], [], [])
    assert "lora-moa" not in pipelines and BASE not in needed and "moa-lite" in pipelines
    with pytest.raises(AdapterError, match="adapter 'french'.*scripts/train_adapters.py"):
        check_adapters(registry, list(registry.pipeline("lora-moa").models()))
