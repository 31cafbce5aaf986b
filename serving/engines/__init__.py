"""Engines: one per model, built from its models.yaml entry; the pool starts them where the plan says and checks them.
Imports moa/, serving.models and serving.placement; never serving.bench, serving.api or serving.cli.

Backends are imported lazily so that, say, the openai backend works on a machine
without torch or vLLM installed.
"""

from __future__ import annotations

from moa.engine import Engine
from serving.models.registry import ModelSpec
from serving.models.store import resolve


def create_engine(spec: ModelSpec, *, cpu_threads_bind: str | None = None,
                  gpu_memory_utilization: float | None = None, cuda_visible_devices: str | None = None,
                  ray_address: str | None = None, as_checked: bool = True) -> Engine:
    """Build (not start) the engine for one model; weights must already be on disk.

    A vLLM model goes into a Ray actor when its entry says `placement: ray`, or when a Ray
    address is given for all (`moa serve --ray-address`). On a CPU it runs in the dtype that
    passed its known-answer check here (serving/models/checked_dtype.py) unless `as_checked=False`
    (`moa models check`, which re-decides).
    """
    from serving.models.checked_dtype import checked_spec
    from serving.placement.plan import in_ray

    if as_checked:
        spec = checked_spec(spec)

    if in_ray(spec, ray_address):
        from serving.engines.ray_engine import RayEngine

        return RayEngine(spec, resolve(spec), address=ray_address, cpu_threads_bind=cpu_threads_bind,
                         gpu_memory_utilization=gpu_memory_utilization)
    if spec.backend == "vllm":
        from serving.engines.vllm_engine import VLLMEngine

        return VLLMEngine(spec, resolve(spec), cpu_threads_bind=cpu_threads_bind,
                          gpu_memory_utilization=gpu_memory_utilization, cuda_visible_devices=cuda_visible_devices)
    if spec.backend == "openai":
        from serving.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(spec)
    if spec.backend == "transformers":
        from serving.engines.transformers_engine import TransformersEngine

        return TransformersEngine(spec, resolve(spec))
    raise ValueError(f"model {spec.name!r}: unknown backend {spec.backend!r}")
