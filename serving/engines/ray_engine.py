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
import logging
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
from serving.models.registry import ModelSpec
from serving.models.store import LocalModel

_ids = itertools.count()
log = logging.getLogger(__name__)
FORWARDED_ENV = ("VLLM_HOST_IP", "HF_HUB_OFFLINE", "VLLM_LOGGING_LEVEL", "VLLM_LOGGING_CONFIG_PATH",
                 "VLLM_CONFIGURE_LOGGING", "HF_HOME", "MOA_HOME")


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
        self._tokenizer: Any = None  # the model's own, on this side: requests are checked before they stream
        self._state = "stopped"
        self._watch: asyncio.Task | None = None

    probe_every_s: float = 2.0  # how often the actor is asked whether it is up (a tiny call)
    probe_timeout_s: float = 10.0  # an actor that does not answer within this is not ready

    @property
    def state(self) -> str:
        """ready | restarting (its actor died or does not answer; Ray restarts it, max_restarts) | stopped.

        Known from a probe every `probe_every_s` and from every failed call, so /ready answers 503 while Ray
        rebuilds the actor, not only once a request has failed."""
        return self._state

    async def start(self) -> None:
        import ray

        if self._actor is not None:
            return
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
        from serving.placement.machine import on_cpu
        from serving.placement.plan import ray_demand

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
        self._tokenizer = await asyncio.to_thread(_local_tokenizer, self.model.path)
        self._state = "ready"
        self._watch = asyncio.create_task(self._watch_actor(), name=f"watch {self.name}")

    async def _watch_actor(self) -> None:
        from ray.exceptions import RayError

        while self._actor is not None:
            await asyncio.sleep(self.probe_every_s)
            actor = self._actor
            if actor is None:
                return
            try:
                node = await asyncio.wait_for(actor.describe.remote(), self.probe_timeout_s)
            except (RayError, TimeoutError):
                self._state = "restarting"
                continue
            except Exception as exc:  # noqa: BLE001 - the probe must outlive anything a call can raise
                log.warning("model %s: probing its Ray actor failed: %s", self.name, exc)
                self._state = "restarting"
                continue
            if node.get("pid") != self.node.get("pid"):  # Ray restarted it: a new process, new engine core
                self.node = node
            self._state = "ready"

    def validate_request(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[int] | None:
        """As VLLMEngine's, with the model's tokenizer on this side (the actor's vLLM templates the same way):
        a request beyond the context is a 400 before any byte of a stream. None where the weights are not on
        this machine (the actor still refuses it, as an error inside the stream)."""
        from serving.engines.vllm_args import speculation_refusal
        from serving.engines.vllm_engine import check_fits, template_ids

        if (refusal := speculation_refusal(self.spec, params.temperature)) is not None:
            raise InvalidRequest(refusal, param="temperature")
        if self._tokenizer is None:
            return None
        ids = template_ids(self._tokenizer, messages)
        check_fits(self.name, ids, params, self.max_model_len)
        return ids

    async def close(self) -> None:
        actor, self._actor = self._actor, None
        self._state = "stopped"
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
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
            raise self._failed(exc) from exc

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
            raise self._failed(exc) from exc
        finally:
            self.stats.end(outcome)

    def _failed(self, exc: BaseException) -> Exception:
        from ray.exceptions import RayActorError

        if isinstance(exc, RayActorError):
            self._state = "restarting"  # until the probe reaches the rebuilt actor
        return _translate(self.name, exc)


def _local_tokenizer(path: Path) -> Any:
    """The model's tokenizer from its weights folder, where this machine has it (the usual case: the pool
    resolves the weights here and the actors read the same path)."""
    if not (Path(path) / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


def _translate(name: str, exc: BaseException) -> Exception:
    """Ray's wrappers → the protocol's errors: the caller's fault stays a 4xx, the rest an EngineError."""
    from ray.exceptions import RayActorError

    cause = _cause(exc)
    if isinstance(cause, InvalidRequest):
        return InvalidRequest(str(cause), param=getattr(cause, "param", "max_tokens"))
    if isinstance(cause, EngineError):
        return EngineError(str(cause))
    if isinstance(exc, RayActorError):
        return EngineError(f"model {name!r}: its Ray actor is gone or restarting ({type(exc).__name__}); "
                           "Ray restarts it and the engine rebuilds (tens of seconds)")
    return EngineError(f"model {name!r}: Ray call failed: {type(cause).__name__}: {cause}")
