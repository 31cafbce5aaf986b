"""The placement planner: GPU inventories, model memory estimates, device sets and fractions, core splits.

Pure arithmetic, checked against published parameter counts and the embedded checkpoints' real
tensors; no GPU needed.
"""

from __future__ import annotations

import pytest

from serving.placement.devices import (
    GB,
    Demand,
    Gpu,
    ModelShape,
    PlanError,
    parse_gpus,
    plan_cores,
    plan_gpus,
    shape_from_checkpoint,
    shape_from_config,
)

# Published configs (config.json on the hub), abridged to what the planner reads.
QWEN_72B = {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
            "intermediate_size": 29568, "vocab_size": 152064, "tie_word_embeddings": False}
LLAMA_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
             "intermediate_size": 28672, "vocab_size": 128256, "tie_word_embeddings": False}
MIXTRAL_8X7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8,
                "tie_word_embeddings": False}


@pytest.mark.parametrize(("config", "published"), [(QWEN_72B, 72.7e9), (LLAMA_70B, 70.6e9),
                                                   (MIXTRAL_8X7B, 46.7e9)])
def test_parameter_counts_match_the_published_ones(config, published):
    assert shape_from_config(config).params == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_parameter_counts_match_the_embedded_checkpoints_tensors(local_model, name):
    from safetensors import safe_open

    from serving.models.store import resolve

    path = resolve(local_model(name)).path
    counted = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                counted += int(__import__("math").prod(shape))
    shape = shape_from_checkpoint(path)
    assert shape.params == pytest.approx(counted, rel=0.01)
    assert shape.checkpoint_bytes == pytest.approx(2 * counted, rel=0.01)  # bf16 on disk


def test_gpu_inventories():
    assert [g.id for g in parse_gpus("8x80GB")] == [str(i) for i in range(8)]
    mixed = parse_gpus("2x24GB, 1x48GB")
    assert [(g.id, g.total_bytes / GB) for g in mixed] == [("0", 24), ("1", 24), ("2", 48)]
    assert parse_gpus("80GiB")[0].total_bytes == 80 * 2**30
    for bad in ("", "8x", "eight", "0x80GB", "2x24GB,,"):
        with pytest.raises(PlanError, match="--gpus"):
            parse_gpus(bad)


def demand(name, config, **engine) -> Demand:
    return Demand(name, shape_from_config(config), **engine)


NODE = [  # the in-process node of examples/models.gpu.yaml
    demand("qwen2.5-72b", QWEN_72B, quantization="awq", tensor_parallel_size=2, max_model_len=8192, max_num_seqs=16),
    demand("llama-3.3-70b", LLAMA_70B, quantization="awq", tensor_parallel_size=2, max_model_len=8192,
           max_num_seqs=16),
    demand("mixtral-8x7b", MIXTRAL_8X7B, quantization="awq", tensor_parallel_size=2, max_model_len=8192,
           max_num_seqs=16),
    demand("aggregator", QWEN_72B, quantization="fp8", tensor_parallel_size=2, max_model_len=8192, max_num_seqs=16),
]


def test_the_gpu_example_fits_one_8x80gb_node_on_disjoint_pairs():
    plan = plan_gpus(parse_gpus("8x80GB"), NODE)
    devices = [set(p.devices) for p in plan.placements.values()]
    assert all(len(d) == 2 for d in devices) and set().union(*devices) == {str(i) for i in range(8)}
    for p in plan.placements.values():
        assert p.need_per_device <= p.gpu_memory_utilization * 80 * GB <= 0.9 * 80 * GB
    assert max(plan.used.values()) <= 0.9


def test_one_24gb_gpu_is_refused_naming_the_model_and_the_shortfall():
    with pytest.raises(PlanError, match=r"needs 2 GPUs .* the inventory has 1"):
        plan_gpus(parse_gpus("1x24GB"), NODE)
    single = [demand("qwen2.5-72b", QWEN_72B, quantization="awq", max_model_len=8192, max_num_seqs=16)]
    with pytest.raises(PlanError, match=r"model 'qwen2.5-72b' does not fit: it needs [\d.]+ GB .* [\d.]+ GB short"):
        plan_gpus(parse_gpus("1x24GB"), single)


def test_small_models_share_a_gpu_with_fractions_that_add_up():
    shape = ModelShape(params=1.5e9, layers=28, kv_heads=2, head_dim=128)
    demands = [Demand(f"m{i}", shape, dtype="bfloat16", max_model_len=4096) for i in range(3)]
    plan = plan_gpus(parse_gpus("1x80GB"), demands)
    fractions = [p.gpu_memory_utilization for p in plan.placements.values()]
    assert all(p.devices == ("0",) for p in plan.placements.values())
    assert sum(fractions) <= 0.9 and fractions[0] == fractions[1] == fractions[2]
    assert all(f * 80 * GB >= p.need_per_device for f, p in zip(fractions, plan.placements.values(), strict=True))


def test_explicit_devices_and_fractions_are_honoured_and_checked():
    shape = ModelShape(params=7e9, layers=32, kv_heads=8, head_dim=128)
    plan = plan_gpus(parse_gpus("4x80GB"), [
        Demand("pinned", shape, tensor_parallel_size=2, devices=("2", "3"), gpu_memory_utilization=0.5),
        Demand("free", shape, tensor_parallel_size=2),
    ])
    assert plan.placements["pinned"].devices == ("2", "3") and plan.placements["pinned"].gpu_memory_utilization == 0.5
    assert set(plan.placements["free"].devices) == {"0", "1"}  # the emptiest devices
    with pytest.raises(PlanError, match="not among the GPUs"):
        plan_gpus(parse_gpus("2x80GB"), [Demand("x", shape, devices=("5",))])
    with pytest.raises(PlanError, match="2 devices listed, but .* = 1"):
        plan_gpus(parse_gpus("2x80GB"), [Demand("x", shape, devices=("0", "1"))])
    with pytest.raises(PlanError, match="gpu_memory_utilization 0.05 gives 4.0 GB on GPU 0"):
        plan_gpus(parse_gpus("1x80GB"), [Demand("x", shape, gpu_memory_utilization=0.05)])


def test_a_checkpoint_on_disk_counts_its_real_bytes_rescaled_to_the_dtype():
    shape = ModelShape(params=1e9, layers=1, kv_heads=1, head_dim=64, checkpoint_bytes=2e9,
                       checkpoint_dtype="bfloat16")
    assert Demand("m", shape, dtype="float32").weight_bytes == 4e9
    assert Demand("m", shape, dtype="auto").weight_bytes == 2e9
    assert Demand("m", shape, quantization="awq").weight_bytes == 2e9  # packed checkpoint: its bytes as they are


def test_core_split_weighted_by_size():
    assert plan_cores(list(range(16)), {"big": 7e9, "small": 5e8}) == {
        "big": ",".join(map(str, range(15))), "small": "15"}
    assert plan_cores([0], {"a": 1.0, "b": 1.0}) == {"a": "0", "b": "0"}  # fewer cores than engines: share
    assert plan_cores(list(range(4)), {"a": 1.0, "b": 1.0}) == {"a": "0,1", "b": "2,3"}


def test_an_engine_under_one_core_shares_a_core_of_the_largest_instead_of_taking_one():
    # moa-lite after --swap on 2 cores: the 0.5B keeps both cores, SmolLM2 (share 0.43) binds the last one.
    assert plan_cores([0, 1], {"big": 5e8, "small": 1.35e8}) == {"big": "0,1", "small": "1"}
    # Three embedded models on 2 cores: the 1.5B binds both, the two small ones one each, from the end.
    assert plan_cores([0, 1], {"l": 1.54e9, "m": 4.9e8, "s": 1.35e8}) == {"l": "0,1", "m": "1", "s": "0"}
    # Engines of a core or more still split disjointly; only the one under a core overlaps.
    assert plan_cores(list(range(8)), {"big": 1.5e9, "mid": 5e8, "small": 1.35e8}) == {
        "big": "0,1,2,3,4,5", "mid": "6,7", "small": "5"}


def test_gpu_ids_keep_their_names():
    gpus = [Gpu("3", 80 * GB), Gpu("5", 80 * GB)]
    plan = plan_gpus(gpus, [Demand("m", ModelShape(1e9, 16, 8, 64), tensor_parallel_size=2)])
    assert plan.placements["m"].cuda_visible_devices == "3,5"


# -- the plan applied to real engines (vLLM CPU build) --------------------------------------------


class FakeNVML:
    """pynvml's calls detect_gpus makes, for a node of `gpus` (name, GiB), in NVML's (PCI bus) order."""

    def __init__(self, gpus: list[tuple[str, float]]) -> None:
        self.gpus = gpus

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, i: int) -> bytes:
        return self.gpus[i][0].encode()

    def nvmlDeviceGetMemoryInfo(self, i: int):
        from types import SimpleNamespace

        return SimpleNamespace(total=self.gpus[i][1] * 2**30)


MIXED = [("NVIDIA L4", 24), ("NVIDIA L4", 24), ("NVIDIA L40S", 48)]  # `--gpus 2x24GB,1x48GB`, as NVML sees it


def test_the_machine_report_names_gpus_through_nvml_without_touching_cuda(monkeypatch):
    """Before: torch.cuda.get_device_name(0) made a CUDA context on GPU 0 in the parent before any engine."""
    import sys

    import torch

    from serving.bench.environment import gpu

    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda was called in the parent process")

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(MIXED))
    for name in ("is_available", "device_count", "get_device_name", "init"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    assert gpu() == "2x NVIDIA L4 (24 GiB), 1x NVIDIA L40S (48 GiB)"
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([]))
    assert gpu() == "no GPU"


def test_visible_devices_are_read_in_nvml_order_and_a_conflicting_cuda_order_is_refused(monkeypatch):
    import sys

    from serving.placement.devices import detect_gpus

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(MIXED))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    assert [(g.id, g.name) for g in detect_gpus()] == [("2", "NVIDIA L40S")]
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert [g.id for g in detect_gpus()] == ["2"]
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")  # "2" would be CUDA's third-fastest: maybe an L4
    with pytest.raises(PlanError, match="CUDA_DEVICE_ORDER=FASTEST_FIRST.*PCI_BUS_ID"):
        detect_gpus()
    from serving.bench.environment import gpu

    assert gpu().startswith("GPUs not read: CUDA_VISIBLE_DEVICES=2")  # a benchmark's report is still written


def engine_core_env(engine) -> dict[str, str]:
    import psutil

    cores = [pid for pid in engine.core_pids
             if psutil.pid_exists(pid) and "EngineCore" in " ".join([psutil.Process(pid).name(),
                                                                      *psutil.Process(pid).cmdline()])]
    assert len(cores) == 1, engine.core_pids
    from serving.placement.check import environ_of

    return environ_of(cores[0])


@pytest.mark.vllm
async def test_each_engine_core_is_spawned_with_its_planned_gpus(registry, local_model):
    """The mechanism that pins engines to GPUs, checked where it happens: the environment each EngineCore
    process really received. The vLLM CPU build ignores CUDA_VISIBLE_DEVICES, so this runs on any machine."""
    import os

    from serving.engines.pool import EnginePool
    from tests.conftest import QWEN_SMALL, SMALL

    local_model(SMALL)
    local_model(QWEN_SMALL)
    parent_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    async with EnginePool(registry, [QWEN_SMALL, SMALL], gpus=parse_gpus("2x80GB"), verify=False) as pool:
        planned = {name: p.cuda_visible_devices for name, p in pool.plan.gpu.placements.items()}
        assert sorted(planned.values()) == ["0", "1"]  # one GPU each, not both on the same one
        for name in (QWEN_SMALL, SMALL):
            env = engine_core_env(pool[name])
            assert env["CUDA_VISIBLE_DEVICES"] == planned[name] and env["MOA_ENGINE"] == name
            # The plan numbers GPUs as NVML does (PCI bus order); CUDA must too, or on a mixed node the
            # engine lands on another GPU than planned.
            assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == parent_before  # set for the spawn, then restored


@pytest.mark.vllm
async def test_cpu_engines_are_spawned_with_the_planned_core_binds(small_pool, registry):
    """Each EngineCore really received its plan's core list (the arithmetic: the tests above)."""
    import os

    from serving.placement.plan import plan_engines
    from tests.conftest import QWEN_SMALL

    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        pytest.skip("VLLM_CPU_OMP_THREADS_BIND is set: every engine takes it instead of the plan")
    plan = plan_engines(registry, list(small_pool), cpu=True)
    for name, engine in small_pool.items():
        env = engine_core_env(engine)
        assert "CUDA_VISIBLE_DEVICES" not in env
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == plan.cores[name]
    if len(os.sched_getaffinity(0)) <= 4:  # SmolLM2's share is under one core: the 0.5B keeps them all
        assert plan.cores[QWEN_SMALL] == ",".join(map(str, sorted(os.sched_getaffinity(0))))
