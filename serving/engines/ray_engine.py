"""A vLLM engine inside a Ray actor, placed by Ray's scheduler: the same Engine protocol, past one machine.

The actor owns an in-process `VLLMEngine` (so an AsyncLLM, prompts templated there, n=k as one
request); this side keeps the protocol. Streaming goes through a Ray streaming generator, one
object per Delta and the final Generation. Cancelling the consumer cancels the actor task, which
raises CancelledError inside the actor's generator, and `VLLMEngine.stream` aborts the request
in vLLM. A dead actor is restarted by Ray (`max_restarts`); its __init__ builds the engine again,
and requests in the meantime fail with EngineError, so the pipeline's fault rules apply.

Plain Ray actors rather than Ray Serve: moa needs per-request cancellation into the engine, n=k
requests and teacher-forced checks on one specific engine, which a handle to one actor gives
directly; Serve's replicas and autoscaling would sit behind its own router (docs/DEPLOY.md).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from moa.engine import (
    ChatMessage,
    EngineError,
    EngineStats,
    Generation,
    InvalidRequest,
    SamplingParams,
    StreamEvent,
    StreamingEngine,
)
from serving.registry import ModelSpec
from serving.store import LocalModel

_ids = itertools.count()
FORWARDED_ENV = ("VLLM_HOST_IP", "HF_HUB_OFFLINE", "VLLM_LOGGING_LEVEL", "HF_HOME", "MOA_HOME")


class EngineActor:
    """Runs in the Ray worker: one model's VLLMEngine, built in __init__ so a restarted actor rebuilds it."""

    def __init__(self, spec_json: str, model_path: str, cpu_threads_bind: str | None = None) -> None:
        from serving.engines.vllm_engine import VLLMEngine

        spec = ModelSpec.model_validate_json(spec_json)
        self.engine = VLLMEngine(spec, LocalModel(spec.name, Path(model_path)), cpu_threads_bind=cpu_threads_bind)
        self.engine.start_blocking()

    def describe(self) -> dict[str, Any]:
        import socket

        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
                "max_model_len": self.engine.max_model_len, "dtype": self.engine.dtype,
                "core_pids": self.engine.core_pids}

    async def stream(self, messages: Any, params: SamplingParams, request_id: str) -> AsyncIterator[StreamEvent]:
        async for event in self.engine.stream(messages, params, request_id=request_id):
            yield event

    def running_requests(self) -> int:
        return self.engine.running_requests

    async def reset_prefix_cache(self) -> None:
        await self.engine.reset_prefix_cache()

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    async def top1_tokens(self, token_ids: list[int], start: int) -> list[int]:
        return await self.engine.top1_tokens(token_ids, start)

    async def greedy_tokens(self, token_ids: list[int], max_tokens: int) -> list[int]:
        return await self.engine.greedy_tokens(token_ids, max_tokens)


class RayEngine(StreamingEngine):
    """One model's engine in a Ray actor. `address`: the cluster (`auto`, `ray://host:10001`, None = local)."""

    def __init__(self, spec: ModelSpec, model: LocalModel, *, address: str | None = None,
                 cpu_threads_bind: str | None = None, cuda_visible_devices: str | None = None,
                 gpu_memory_utilization: float | None = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.model = model
        self.address = address
        self.stats = EngineStats()
        self._cpu_threads_bind = cpu_threads_bind
        self._gpu_memory_utilization = gpu_memory_utilization
        self._actor: Any = None
        self.node: dict[str, Any] = {}
        self.max_model_len: int | None = None
        self.dtype: str | None = None

    async def start(self) -> None:
        import ray

        if self._actor is not None:
            return
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
        from serving.engines.vllm_args import on_cpu
        from serving.planning import ray_demand

        options = self.spec.ray
        demand = ray_demand(self.spec, cpu=on_cpu())
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
        env.update(options.env)
        spec = self.spec
        if self._gpu_memory_utilization is not None and spec.engine.gpu_memory_utilization is None:
            spec = spec.model_copy(update={"engine": spec.engine.model_copy(
                update={"gpu_memory_utilization": self._gpu_memory_utilization})})
        custom = {k: v for k, v in demand.items() if k not in ("CPU", "GPU")}
        actor_class = ray.remote(EngineActor).options(
            num_cpus=demand.get("CPU", 0.0),
            num_gpus=demand.get("GPU", 0.0),
            resources=custom or None,
            max_restarts=options.max_restarts,
            max_task_retries=0,  # a request in flight when the actor dies fails; the pipeline decides
            max_concurrency=1000,
            runtime_env={"env_vars": env},
        )
        # On a CPU: the entry's own bind for its node wins over the pool's core split.
        bind = options.env.get("VLLM_CPU_OMP_THREADS_BIND") or self._cpu_threads_bind
        self._actor = actor_class.remote(spec.model_dump_json(), str(self.model.path), bind)
        try:
            self.node = await self._actor.describe.remote()
        except Exception as exc:
            actor, self._actor = self._actor, None
            ray.kill(actor, no_restart=True)
            raise EngineError(f"model {self.name!r}: its Ray actor could not start: {_cause(exc)}") from exc
        self.max_model_len = self.node["max_model_len"]
        self.dtype = self.node["dtype"]

    async def close(self) -> None:
        actor, self._actor = self._actor, None
        if actor is not None:
            import ray

            ray.kill(actor, no_restart=True)  # the actor's process exits; its EngineCore follows it

    async def running_requests(self) -> int:
        """Requests the actor's vLLM engine still tracks."""
        return await self._call("running_requests")

    async def reset_prefix_cache(self) -> None:
        """Drop the actor's cached prompt blocks (benchmarks start cold)."""
        await self._call("reset_prefix_cache")

    async def describe(self) -> dict[str, Any]:
        self.node = await self._call("describe")
        return self.node

    async def top1_tokens(self, token_ids: Sequence[int], start: int) -> list[int]:
        return await self._call("top1_tokens", list(token_ids), start)

    async def greedy_tokens(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        return await self._call("greedy_tokens", list(token_ids), max_tokens)

    async def _call(self, method: str, *args: Any) -> Any:
        if self._actor is None:
            raise EngineError(f"model {self.name!r}: engine is not started")
        try:
            return await getattr(self._actor, method).remote(*args)
        except Exception as exc:
            raise _translate(self.name, exc) from exc

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                     request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        import ray

        if self._actor is None:
            raise EngineError(f"model {self.name!r}: engine is not started")
        payload = messages if isinstance(messages, str) else [dict(m) for m in messages]
        rid = request_id or f"{self.name}-ray-{next(_ids)}"
        generator = self._actor.stream.options(num_returns="streaming").remote(payload, params, rid)
        self.stats.begin()
        outcome = "error"
        try:
            async for ref in generator:
                event = await ref
                yield event
                if isinstance(event, Generation):
                    outcome = "finished"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "aborted"
            ray.cancel(generator)  # CancelledError inside the actor: VLLMEngine aborts the request in vLLM
            raise
        except Exception as exc:
            raise _translate(self.name, exc) from exc
        finally:
            self.stats.end(outcome)


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


def _translate(name: str, exc: BaseException) -> Exception:
    """Ray's wrappers → the protocol's errors: the caller's fault stays a 4xx, the rest an EngineError."""
    from ray.exceptions import RayActorError

    cause = _cause(exc)
    if isinstance(cause, InvalidRequest):
        return InvalidRequest(str(cause))
    if isinstance(cause, EngineError):
        return EngineError(str(cause))
    if isinstance(exc, RayActorError):
        return EngineError(f"model {name!r}: its Ray actor is gone or restarting ({type(exc).__name__}); "
                           "Ray restarts it and the engine rebuilds (tens of seconds)")
    return EngineError(f"model {name!r}: Ray call failed: {type(cause).__name__}: {cause}")
