"""models.yaml entries → placement demands → the plan an engine pool applies (see serving/placement/devices.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from serving.models.registry import ModelSpec, Registry
from serving.models.store import ModelNotAvailable, resolve
from serving.placement.devices import (
    DEFAULT_MAX_MODEL_LEN,
    Demand,
    Gpu,
    GpuPlan,
    ModelShape,
    PlanError,
    detect_gpus,
    plan_cores,
    plan_gpus,
    shape_from_checkpoint,
)


def model_shape(spec: ModelSpec) -> ModelShape:
    """From the checkpoint when it is on disk, else from the entry's `size:` block."""
    if spec.source is not None:
        try:
            return shape_from_checkpoint(resolve(spec).path)
        except (ModelNotAvailable, FileNotFoundError, KeyError):
            pass
    if spec.size is not None:
        s = spec.size
        return ModelShape(s.params_b * 1e9, s.layers, s.kv_heads, s.head_dim)
    raise PlanError(f"model {spec.name!r}: cannot estimate its memory: its checkpoint is not on this machine and "
                    "its entry has no `size: {params_b: ..., layers: ..., kv_heads: ..., head_dim: ...}` block")


def demand_for(spec: ModelSpec) -> Demand:
    e = spec.engine
    return Demand(
        name=spec.name,
        shape=model_shape(spec),
        dtype=e.dtype,
        quantization=e.quantization,
        tensor_parallel_size=e.tensor_parallel_size,
        pipeline_parallel_size=e.pipeline_parallel_size,
        max_model_len=e.max_model_len or DEFAULT_MAX_MODEL_LEN,  # what the engine gets (vllm_args.py)
        max_num_seqs=e.max_num_seqs,
        devices=tuple(str(d) for d in e.devices) if e.devices is not None else None,
        gpu_memory_utilization=e.gpu_memory_utilization,
        lora_bytes=lora_bytes(spec),
    )


def lora_bytes(spec: ModelSpec) -> float:
    """The LoRA slots of the entry's adapters (one each, plus the zero adapter) at the largest rank, in 16 bit;
    0 where the base or an adapter config is not on this machine yet (the engine start then says so)."""
    if not spec.adapters or spec.source is None:
        return 0.0
    import json

    from serving.models.adapters import VLLM_RANKS, adapter_dir, lora_memory_bytes

    try:
        base = resolve(spec).path
        ranks = [int(json.loads((adapter_dir(spec.name, name, source) / "adapter_config.json").read_text())["r"])
                 for name, source in spec.adapters.items()]
    except (ModelNotAvailable, OSError, ValueError, KeyError):
        return 0.0
    rank = next((r for r in VLLM_RANKS if r >= max(ranks)), VLLM_RANKS[-1])
    return float(lora_memory_bytes(base, len(ranks) + 1, rank, 4 if spec.engine.dtype == "float32" else 2))


@dataclass(slots=True)
class EnginePlacement:
    """What one engine gets: GPU devices and a memory fraction, or CPU cores."""

    cuda_visible_devices: str | None = None
    gpu_memory_utilization: float | None = None
    cpu_threads_bind: str | None = None


@dataclass(slots=True)
class Plan:
    engines: dict[str, EnginePlacement] = field(default_factory=dict)
    gpu: GpuPlan | None = None  # the GPU plan, when engines run on GPUs
    cores: dict[str, str] = field(default_factory=dict)  # the CPU core split, when they run on a CPU


def ray_address(explicit: str | None = None) -> str | None:
    """The Ray cluster every vLLM engine goes to: the given address, else $MOA_RAY_ADDRESS (set by
    `moa serve/bench --ray-address`), else None (only entries with `placement: ray` use Ray)."""
    return explicit or os.environ.get("MOA_RAY_ADDRESS") or None


def in_ray(spec: ModelSpec, address: str | None) -> bool:
    """Whether this model's engine runs in a Ray actor: the one rule the pool, serve and plan share. A model with
    LoRA adapters stays in-process (its adapters are served by the engine object itself), even under a Ray
    address."""
    return spec.backend == "vllm" and not spec.adapters and (spec.placement == "ray" or address is not None)


def plan_engines(registry: Registry, names: list[str], *, gpus: list[Gpu] | None = None,
                 cpu: bool | None = None, ray: str | None = None) -> Plan:
    """The plan for the local vLLM engines among `names`.

    On GPUs (the inventory given, or read with NVML): device sets and memory fractions, refused
    before anything loads when the models do not fit. On a CPU: core lists weighted by
    model size, an engine under one core's share binding one of the largest's (`plan_cores`; an explicit
    VLLM_CPU_OMP_THREADS_BIND wins). Engines in Ray actors (`ray`: the address) are
    placed on GPUs by Ray's scheduler, so the GPU plan leaves them out; on a CPU they get their
    share of cores like the rest (applied on whichever node the actor lands).
    """
    local = [registry.get(n) for n in registry.engine_names(names) if registry.get(n).backend == "vllm"]
    plan = Plan()
    if not local:  # remote engines only: nothing to place (and vLLM need not be installed)
        return plan
    if cpu is None:
        from serving.placement.machine import on_cpu

        cpu = gpus is None and on_cpu()
    if cpu:
        if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
            return plan
        plan.cores = plan_cores(sorted(os.sched_getaffinity(0)), {s.name: _params_or_one(s) for s in local})
        plan.engines = {name: EnginePlacement(cpu_threads_bind=bind) for name, bind in plan.cores.items()}
        return plan
    local = [s for s in local if not in_ray(s, ray)]
    if not local:
        return plan
    inventory = gpus if gpus is not None else detect_gpus()
    plan.gpu = plan_gpus(inventory, [demand_for(s) for s in local])
    plan.engines = {name: EnginePlacement(cuda_visible_devices=p.cuda_visible_devices,
                                          gpu_memory_utilization=p.gpu_memory_utilization)
                    for name, p in plan.gpu.placements.items()}
    return plan


def _params_or_one(spec: ModelSpec) -> float:
    """Core weight: the model's parameters where they can be read, else an equal share."""
    try:
        return model_shape(spec).params
    except PlanError:
        return 1.0


def ray_demand(spec: ModelSpec, *, cpu: bool) -> dict[str, float]:
    """The resources a model's Ray actor asks for: what Ray's scheduler places it by."""
    options = spec.ray
    world = spec.engine.tensor_parallel_size * spec.engine.pipeline_parallel_size
    gpus = 0.0 if cpu else float(world)
    demand = {"CPU": options.num_cpus if options.num_cpus is not None else (1.0 if gpus == 0 else 0.0),
              "GPU": options.num_gpus if options.num_gpus is not None else gpus, **options.resources}
    return {k: float(v) for k, v in demand.items() if v}


def ray_candidates(nodes: list[dict], demand: dict[str, float]) -> list[dict]:
    """Alive nodes whose total resources can hold the demand (`ray.nodes()` entries); Ray picks among them."""
    return [n for n in nodes if n.get("Alive") and all(n.get("Resources", {}).get(k, 0.0) >= v
                                                       for k, v in demand.items())]
