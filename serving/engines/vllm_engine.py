"""In-process vLLM engine (AsyncLLM), one per model, on CPU or GPU.

The same code serves both: only the engine arguments differ, and those come from
models.yaml plus device defaults (`vllm_args.py`). Prompts are templated here with
the model's own chat template and sent as token ids, so prompt token counts are
exact and the n samples of one request share one prompt (one prefill, shared KV
blocks: vLLM v1 forks n into child requests with seeds seed+i).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, contextmanager
from typing import Any

from moa.engine import (
    ChatMessage,
    Completion,
    Delta,
    EngineError,
    EngineStats,
    Generation,
    InvalidRequest,
    SamplingParams,
    StreamEvent,
    StreamingEngine,
    finish_reason,
    validate_messages,
)
from serving.engines.vllm_args import build_engine_args, speculation_refusal
from serving.engines.vllm_logging import engine_logging_env
from serving.models.adapters import ZERO, Adapter, AdapterError, lora_engine_args, read_adapters, target, zero_adapter
from serving.models.registry import ModelSpec
from serving.models.store import LocalModel
from serving.placement import machine

log = logging.getLogger(__name__)
_ids = itertools.count()


# vLLM spawns its EngineCore with a copy of this process's environment and takes no environment of its own, so
# an engine's placement (core bind, GPUs) is set in os.environ around the build. Builds run in worker threads
# (start() and restarts): this lock keeps two of them (two engines dying together) from handing each other's
# placement to their EngineCores, or leaving the parent with a stale value.
_SPAWN_LOCK = threading.Lock()


@contextmanager
def _environ(values: dict[str, str]):
    """Set variables for the engine process we are about to spawn (it copies our environment); the caller holds
    `_SPAWN_LOCK`."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def template_ids(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """The prompt as the engine sees it: a conversation through the model's chat template, a raw prompt
    (/v1/completions) as it is."""
    validate_messages(messages)
    if isinstance(messages, str):
        return list(tokenizer.encode(messages))
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def check_fits(name: str, prompt_ids: Sequence[int], params: SamplingParams, max_model_len: int | None) -> None:
    if max_model_len is not None and len(prompt_ids) + params.max_tokens > max_model_len:
        raise InvalidRequest(f"model {name!r}: prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds the context length {max_model_len}")


def _children() -> set[int]:
    """This process's descendants, less multiprocessing's resource tracker: it is started by the first engine
    build but serves the whole process, so it is no engine's."""
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(proc.cmdline()):
                pids.add(proc.pid)
        except psutil.Error:  # exited between the listing and the read
            continue
    return pids


class VLLMEngine(StreamingEngine):
    """One model served by an in-process vLLM AsyncLLM.

    A dead engine core (the CPU worker can die on some sampling paths) is detected
    on the next request and restarted, so one bad batch does not take the
    model offline for good.
    """

    def __init__(self, spec: ModelSpec, model: LocalModel, *, cpu_threads_bind: str | None = None,
                 gpu_memory_utilization: float | None = None, cuda_visible_devices: str | None = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.model = model
        self.stats = EngineStats()
        self._cpu_threads_bind = cpu_threads_bind
        self._gpu_memory_utilization = gpu_memory_utilization
        self._cuda_visible_devices = cuda_visible_devices
        self.core_pids: list[int] = []  # the processes this engine spawned (EngineCore and its workers)
        self._llm: Any = None
        self._tokenizer: Any = None
        self._restart_lock = asyncio.Lock()
        self._restart_failed: tuple[int, float, str] | None = None  # failures in a row, when, why
        self.start_seconds: float | None = None
        self.max_model_len: int | None = None
        self.dtype: str | None = None
        self.adapters: dict[str, Adapter] = {}  # models.yaml `adapters:`, checked against the base at start
        self._loras: dict[str, Any] = {}  # adapter name -> vLLM LoRARequest
        self._base_lora: Any = None  # the zero adapter base-model requests carry on an engine with adapters

    # On an engine with adapters, base-model requests carry the zero adapter (serving/models/adapters.py): off, they run
    # without LoRA beside adapter requests in one batch, which decoded garbage on an Intel AMX CPU (issue 26).
    base_requests_carry_zero_adapter: bool = True

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._llm is not None:
            return
        # Building the engine blocks for tens of seconds (weights, KV cache, warm-up):
        # do it off the event loop so a server stays responsive (health checks) meanwhile.
        await asyncio.to_thread(self.start_blocking)
        try:
            await self._load_adapters()
        except BaseException:
            await self._shut_down()  # no engine process left behind by a start that failed
            raise

    def start_blocking(self) -> None:
        """Build the engine in the calling thread (a Ray actor's __init__ does, so restarts rebuild it).

        Returns nothing on purpose: an executor future holding the engine would keep it alive
        after close().
        """
        started = time.perf_counter()
        self._read_adapters()
        # Under the spawn lock from before to after: the processes this build spawned are the new children
        # only while no other engine builds (two restarting together would each claim the other's).
        with _SPAWN_LOCK:
            before = _children()
            # No local name for the engine: vLLM's first imports inside _build keep a frame chain alive that
            # reaches this frame, and a local here would keep the AsyncLLM alive after close().
            self._llm = self._build()
            self.core_pids = sorted(_children() - before)
        self._tokenizer = self._llm.get_tokenizer()
        self.max_model_len = self._llm.model_config.max_model_len
        self.dtype = str(self._llm.model_config.dtype).removeprefix("torch.")  # `auto` resolved
        self.start_seconds = time.perf_counter() - started
        log.info("engine %s ready in %.1f s", self.name, self.start_seconds)

    def _read_adapters(self) -> None:
        """Check every adapter against the base before vLLM starts: a misfit names itself here, not at a request."""
        try:
            adapters = read_adapters(self.spec, self.model.path)
        except AdapterError as exc:
            raise EngineError(str(exc)) from exc
        self.adapters = {a.name: a for a in adapters}
        if not adapters:
            return
        from vllm.lora.request import LoRARequest

        from serving.models.store import moa_home

        self._loras = {a.name: LoRARequest(target(self.name, a.name), i, str(a.path))
                       for i, a in enumerate(adapters, 1)}
        try:
            zero = zero_adapter(adapters, moa_home()) if self.base_requests_carry_zero_adapter else None
        except (OSError, ImportError) as exc:
            raise EngineError(f"model {self.name!r}: could not make the zero adapter its base requests carry "
                              f"(under {moa_home()}): {exc}") from exc
        self._base_lora = LoRARequest(target(self.name, ZERO), len(adapters) + 1, str(zero)) if zero else None

    async def _load_adapters(self) -> None:
        """Load every adapter into the engine now, so vLLM's own checks run at start and no request waits."""
        for name, request in [*self._loras.items(), *([(ZERO, self._base_lora)] if self._base_lora else [])]:
            try:
                await self._llm.add_lora(request)
            except Exception as exc:
                raise EngineError(f"model {self.name!r}, adapter {name!r} ({request.lora_path}): vLLM could not "
                                  f"load it: {exc}") from exc

    def lora_request(self, adapter: str | None) -> Any:
        """What a request for the base model (None) or one of its adapters carries into vLLM."""
        if adapter is None:
            return self._base_lora
        if adapter not in self._loras:
            known = ", ".join(self._loras) or "none"
            raise InvalidRequest(f"model {self.name!r} has no adapter {adapter!r}; its adapters: {known}")
        return self._loras[adapter]

    def _build(self) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = build_engine_args(self.spec, self.model.path, gpu_memory_utilization=self._gpu_memory_utilization,
                                   lora=lora_engine_args(list(self.adapters.values())))
        kwargs.setdefault("disable_log_stats", True)  # moa keeps its own metrics; vLLM's periodic log is noise
        # MOA_ENGINE names the model in its processes' environment (/proc/PID/environ): scripts/gpu_smoke.sh
        # maps each GPU process to its engine through it.
        env = {"VLLM_HOST_IP": os.environ.get("VLLM_HOST_IP", "127.0.0.1"), "MOA_ENGINE": self.name,
               **engine_logging_env()}
        if machine.on_cpu() and self._cpu_threads_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self._cpu_threads_bind
        if self._cuda_visible_devices is not None:
            # The EngineCore child inherits this at spawn: the engine sees only its planned GPUs
            # (this process never initialises CUDA itself). The plan numbers GPUs as NVML does (PCI bus
            # order); CUDA numbers them fastest-first unless told otherwise, which on a mixed node would
            # put the engine on another GPU than planned.
            env["CUDA_VISIBLE_DEVICES"] = self._cuda_visible_devices
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        try:
            with _environ(env):  # the caller holds _SPAWN_LOCK
                return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        except Exception as exc:
            raise EngineError(f"model {self.name!r}: vLLM could not start from {self.model.path}: {exc}") from exc

    async def close(self) -> None:
        self._restart_failed = None  # closed on purpose: nothing to restart
        await self._shut_down()

    async def _shut_down(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            # On the loop thread: shutdown cancels AsyncLLM's output-handler task, which is not thread-safe.
            llm.shutdown()
            del llm
            gc.collect()  # AsyncLLM sits in reference cycles; collect it now, not at interpreter exit

    @property
    def running_requests(self) -> int:
        """Requests vLLM still tracks (0 after every request finished or was aborted)."""
        return 0 if self._llm is None else self._llm.get_num_unfinished_requests()

    async def reset_prefix_cache(self) -> None:
        """Drop cached prompt blocks, so a benchmark run starts cold whatever ran before it."""
        if self._llm is not None:
            await self._llm.reset_prefix_cache()

    restart_wait_s: float = 180.0  # how long a request waits for a restart under way before it fails
    restart_retry_s: float = 15.0  # after a failed restart, requests fail fast this long before the next try
    restart_retry_max_s: float = 300.0  # (the wait doubles with each failure in a row, up to this)

    @property
    def state(self) -> str:
        """ready | restarting | dead (its EngineCore died, or its restart failed; a request restarts it) |
        stopped."""
        if self._restart_lock.locked():
            return "restarting"
        if self._llm is None:
            return "dead" if self._restart_failed is not None else "stopped"
        return "dead" if self._llm.errored else "ready"

    async def _ensure_alive(self) -> None:
        """Restart a dead engine for the request that finds it dead; a failed restart is tried again by a later
        request (after `restart_retry_s`, doubling), never left for good — a GPU whose memory the dead core
        had not yet released, for one, frees it seconds later."""
        if self._restart_lock.locked():  # another request is restarting the engine: wait for it, do not fail
            try:
                await asyncio.wait_for(self._restart_lock.acquire(), self.restart_wait_s)
            except TimeoutError:
                raise EngineError(f"model {self.name!r}: still restarting after {self.restart_wait_s:.0f} s; "
                                  "retry later") from None
            self._restart_lock.release()
        if self._llm is None and self._restart_failed is None:
            raise EngineError(f"model {self.name!r}: engine is not started")
        if self._llm is not None and not self._llm.errored:
            return
        async with self._restart_lock:
            if self._llm is not None and not self._llm.errored:
                return  # restarted meanwhile
            if self._llm is None and self._restart_failed is None:
                raise EngineError(f"model {self.name!r}: engine is not started")
            if self._restart_failed is not None:
                failures, at, reason = self._restart_failed
                if (left := at + self._retry_wait(failures) - time.monotonic()) > 0:
                    raise EngineError(f"model {self.name!r}: its engine died and {failures} restart(s) failed, "
                                      f"the last: {reason}; the next request in {left:.0f} s tries again")
            log.error("engine %s %s; restarting it", self.name,
                      "is down after a failed restart" if self._llm is None else "died")
            self.stats.restarts += 1
            await self._shut_down()
            try:
                await self.start()
            except Exception as exc:
                failures = self._restart_failed[0] + 1 if self._restart_failed else 1
                self._restart_failed = (failures, time.monotonic(), str(exc))
                log.error("engine %s: restart %d failed: %s", self.name, failures, exc)
                raise EngineError(f"model {self.name!r}: its engine died and restarting it failed: {exc}; "
                                  f"a request after {self._retry_wait(failures):.0f} s tries again") from exc
            self._restart_failed = None

    def _retry_wait(self, failures: int) -> float:
        return min(self.restart_retry_s * 2 ** (failures - 1), self.restart_retry_max_s)

    # -- requests ------------------------------------------------------------------

    def prompt_token_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return template_ids(self._tokenizer, messages)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    async def top1_tokens(self, token_ids: Sequence[int], start: int) -> list[int]:
        """The engine's own argmax at positions start.. of `token_ids` (teacher forcing; the known-answer check).

        One request with prompt logprobs: vLLM reports each prompt token's rank and the top-1 token
        beside it, from the same forward pass that serves users (prompt-logprob requests skip
        reading the prefix cache, so every position is computed).
        """
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        await self._ensure_alive()
        params = VSamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, detokenize=False,
                                 output_kind=RequestOutputKind.FINAL_ONLY)
        engine_input = self._llm.renderer.render_cmpl([{"prompt_token_ids": list(token_ids)}])[0]
        final = None
        async for out in self._llm.generate(engine_input, params, f"{self.name}-check-{next(_ids)}",
                                            lora_request=self._base_lora):
            final = out
        if final is None or final.prompt_logprobs is None:
            raise EngineError(f"model {self.name!r}: vLLM returned no prompt logprobs")
        top1 = []
        for pos in range(start, len(token_ids)):
            ranked = final.prompt_logprobs[pos]
            top1.append(next(token for token, logprob in ranked.items() if logprob.rank == 1))
        return top1

    async def greedy_tokens(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """The engine's own greedy continuation of `token_ids`, through the decode path users get (the
        known-answer check's second half: teacher forcing above exercises prefill only)."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        await self._ensure_alive()
        params = VSamplingParams(max_tokens=max_tokens, temperature=0, detokenize=False,
                                 output_kind=RequestOutputKind.FINAL_ONLY)
        engine_input = self._llm.renderer.render_cmpl([{"prompt_token_ids": list(token_ids)}])[0]
        final = None
        async for out in self._llm.generate(engine_input, params, f"{self.name}-decode-{next(_ids)}",
                                            lora_request=self._base_lora):
            final = out
        if final is None:
            raise EngineError(f"model {self.name!r}: vLLM returned no output")
        return list(final.outputs[0].token_ids)

    def _sampling_params(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        return VSamplingParams(
            structured_outputs=StructuredOutputsParams(json=params.json_schema) if params.json_schema else None,
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            seed=params.seed,
            stop=list(params.stop) or None,
            logprobs=0 if params.logprobs else None,  # 0: only the sampled token's log-probability
            output_kind=RequestOutputKind.DELTA,
        )

    def validate_request(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[int]:
        """The prompt's token ids, or InvalidRequest if it cannot be served (a server checks before answering)."""
        if (refusal := speculation_refusal(self.spec, params.temperature)) is not None:
            raise InvalidRequest(refusal, param="temperature")
        prompt_ids = self.prompt_token_ids(messages)
        check_fits(self.name, prompt_ids, params, self.max_model_len)
        return prompt_ids

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                     request_id: str | None = None, adapter: str | None = None) -> AsyncIterator[StreamEvent]:
        """`adapter`: one of this engine's LoRA adapters answers (serving/engines/adapter_engine.py)."""
        lora = self.lora_request(adapter)
        await self._ensure_alive()
        prompt_ids = self.validate_request(messages, params)
        rid = request_id or f"{self.name}-{next(_ids)}"
        texts = [""] * params.n
        tokens = [0] * params.n
        reasons: list[str | None] = [None] * params.n
        logprobs: list[float | None] = [0.0 if params.logprobs else None] * params.n
        lowest = [0.0] * params.n
        drafted, accepted = [0] * params.n, [0] * params.n
        cached = 0
        started = time.perf_counter()
        ttft: float | None = None
        self.stats.begin()
        outcome = "error"
        try:
            engine_input = self._llm.renderer.render_cmpl([{"prompt_token_ids": prompt_ids}])[0]
            # aclosing: when this stream is closed (a quorum, a client that left), AsyncLLM.generate is closed
            # too, and aborts the request in the engine before aclose() returns - not whenever it is collected.
            async with aclosing(self._llm.generate(engine_input, self._sampling_params(params), rid,
                                                  priority=params.priority, lora_request=lora)) as outputs:
                async for out in outputs:
                    cached = out.num_cached_tokens or cached
                    for piece in out.outputs:
                        if ttft is None and piece.token_ids:
                            ttft = time.perf_counter() - started
                        texts[piece.index] += piece.text
                        tokens[piece.index] += len(piece.token_ids)
                        if piece.logprobs and logprobs[piece.index] is not None:
                            chosen = [position[token].logprob
                                      for token, position in zip(piece.token_ids, piece.logprobs, strict=False)]
                            logprobs[piece.index] += sum(chosen)
                            lowest[piece.index] = min([lowest[piece.index], *chosen])
                        if piece.finish_reason is not None:
                            reasons[piece.index] = piece.finish_reason
                        if piece.spec_decode_metrics is not None:  # set once, on the sequence's last output
                            drafted[piece.index] = piece.spec_decode_metrics.num_draft_tokens
                            accepted[piece.index] = sum(j * count for j, count in
                                                        enumerate(piece.spec_decode_metrics.histogram))
                        if piece.text or piece.finish_reason is not None:
                            yield Delta(piece.index, piece.text, finish_reason(piece.finish_reason))
            outcome = "finished"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "aborted"  # AsyncLLM.generate aborted the request inside the engine
            raise
        except Exception as exc:
            from vllm.exceptions import VLLMClientError

            if isinstance(exc, (ValueError, VLLMClientError)):
                raise InvalidRequest(f"model {self.name!r}: {exc}") from exc  # vLLM's own request validation
            raise EngineError(f"model {self.name!r}: generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.stats.end(outcome)
        yield Generation(
            model=self.name,
            completions=tuple(
                Completion(i, texts[i], tokens[i], finish_reason(reasons[i]) or "stop", logprobs[i],
                           lowest[i] if params.logprobs else None, drafted[i], accepted[i])
                for i in range(params.n)
            ),
            prompt_tokens=len(prompt_ids),
            cached_prompt_tokens=cached,
            ttft_s=ttft,
            total_s=time.perf_counter() - started,
        )
