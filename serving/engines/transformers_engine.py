"""Fallback engine on Hugging Face transformers, for models or machines vLLM cannot serve.

One worker thread owns the model. Requests that arrive while it is busy and ask
for the same sampling settings are batched into one `generate` call (left
padding, `num_return_sequences=n`); a streamer routes each row's tokens back to
its request, and a stopping criterion ends the rows of a cancelled request so a
client that goes away stops costing compute. accelerate device maps and
bitsandbytes 4/8-bit configs come from models.yaml.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
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
    validate_messages,
)
from serving.models.registry import ModelSpec
from serving.models.store import LocalModel

log = logging.getLogger(__name__)
DEFAULT_MAX_BATCH = 8


@dataclass(eq=False)
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float = field(default_factory=time.perf_counter)
    ttft: float | None = None
    cancelled: bool = False

    def emit(self, event: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys share one generate call; seeded jobs run alone (one RNG per call)."""
        p = self.params
        return None if p.seed is not None else (p.n, p.temperature, p.top_p, p.max_tokens, p.stop)


class _Row:
    """One sample being generated: its tokens, the text already sent, and how it ended."""

    def __init__(self, job: _Job, index: int) -> None:
        self.job, self.index = job, index
        self.ids: list[int] = []
        self.sent = ""
        self.finish: str | None = None


class TransformersEngine(StreamingEngine):
    def __init__(self, spec: ModelSpec, model: LocalModel) -> None:
        self.name = spec.name
        self.spec = spec
        self.model_dir = model.path
        self.stats = EngineStats()
        self.max_batch = spec.engine.max_num_seqs or DEFAULT_MAX_BATCH
        self.max_model_len: int | None = spec.engine.max_model_len
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self.start_seconds: float | None = None
        self.dtype: str | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._worker is not None:
            return
        started = time.perf_counter()
        await asyncio.to_thread(self._load)
        self._worker = threading.Thread(target=self._serve, name=f"transformers-{self.name}", daemon=True)
        self._worker.start()
        self.start_seconds = time.perf_counter() - started

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars; a server's log is no place for them
        e = self.spec.engine
        kwargs: dict[str, Any] = {"dtype": getattr(torch, e.dtype) if e.dtype != "auto" else "auto"}
        if e.quantization in ("bitsandbytes", "bitsandbytes-8bit"):
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_8bit=True) if e.quantization == "bitsandbytes-8bit"
                else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=kwargs["dtype"] if e.dtype != "auto" else torch.bfloat16)
            )
        # awq / gptq / fp8 checkpoints carry their quantization config: transformers reads it itself.
        if e.device_map or e.device != "auto":
            kwargs["device_map"] = e.device_map or e.device
        elif torch.cuda.is_available():
            kwargs["device_map"] = "auto"
        kwargs.update(e.extra)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), padding_side="left")
            self._model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), **kwargs).eval()
        except Exception as exc:
            raise EngineError(f"model {self.name!r}: transformers could not load {self.model_dir}: {exc}") from exc
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        if self.max_model_len is None:
            self.max_model_len = getattr(self._model.config, "max_position_embeddings", None)
        self.dtype = str(self._model.dtype).removeprefix("torch.")

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            self._jobs.put(None)
            await asyncio.to_thread(worker.join)
        self._model = None

    # -- requests ------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    async def top1_tokens(self, token_ids: Sequence[int], start: int) -> list[int]:
        """The model's argmax at positions start.. of `token_ids`, from one forward pass (known-answer check)."""
        if self._model is None:
            raise EngineError(f"model {self.name!r}: engine is not started")
        return await asyncio.to_thread(self._top1, list(token_ids), start)

    def _top1(self, token_ids: list[int], start: int) -> list[int]:
        import torch

        with torch.inference_mode():
            logits = self._model(torch.tensor([token_ids], device=self._model.device)).logits
        return logits[0, start - 1:-1].argmax(dim=-1).tolist()

    async def greedy_tokens(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """The model's own greedy continuation of `token_ids` (known-answer check: the decode path)."""
        if self._model is None:
            raise EngineError(f"model {self.name!r}: engine is not started")
        return await asyncio.to_thread(self._greedy, list(token_ids), max_tokens)

    def _greedy(self, token_ids: list[int], max_tokens: int) -> list[int]:
        import torch

        ids = torch.tensor([token_ids], device=self._model.device)
        with torch.inference_mode():
            out = self._model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_tokens, pad_token_id=self._tokenizer.pad_token_id
                                       or self._tokenizer.eos_token_id)
        return out[0, len(token_ids):].tolist()

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                     request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        if self._worker is None:
            raise EngineError(f"model {self.name!r}: engine is not started")
        self._ensure_worker()
        validate_messages(messages)
        if params.json_schema is not None:
            raise InvalidRequest(
                f"model {self.name!r}: the transformers backend has no guided decoding for JSON schemas; "
                "use a vllm (or openai) backend model for structured output such as the council strategy"
            )
        if isinstance(messages, str):  # a raw prompt (/v1/completions): no chat template
            prompt_ids = list(self._tokenizer.encode(messages))
        else:
            ids = self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            prompt_ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if self.max_model_len and len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"model {self.name!r}: prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                f"exceeds the context length {self.max_model_len}"
            )
        job = _Job(prompt_ids, params, asyncio.get_running_loop(), asyncio.Queue())
        self.stats.begin()
        outcome = "error"
        self._jobs.put(job)
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, BaseException):
                    raise EngineError(f"model {self.name!r}: generation failed: {event}") from event
                yield event
                if isinstance(event, Generation):
                    outcome = "finished"
                    return
        except (asyncio.CancelledError, GeneratorExit):
            job.cancelled = True  # the worker's stopping criterion ends this job's rows
            outcome = "aborted"
            raise
        finally:
            self.stats.end(outcome)

    def _ensure_worker(self) -> None:
        """A worker thread that died (a fatal error in a batch) is replaced; the model it served is intact."""
        if self._worker is not None and not self._worker.is_alive():
            log.error("transformers engine %s: its worker thread died; starting another", self.name)
            self.stats.restarts += 1
            self._worker = threading.Thread(target=self._serve, name=f"transformers-{self.name}", daemon=True)
            self._worker.start()

    # -- worker thread -------------------------------------------------------------

    def _serve(self) -> None:
        pending: list[_Job] = []
        while True:
            job = pending.pop(0) if pending else self._jobs.get()
            if job is None:
                return
            batch = [job]
            key = job.batch_key()
            while key is not None and len(batch) * job.params.n < self.max_batch:
                try:
                    other = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if other is None:
                    self._jobs.put(None)
                    break
                (batch if other.batch_key() == key else pending).append(other)
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            self.stats.extra["batches"] = self.stats.extra.get("batches", 0) + 1
            self.stats.extra["largest_batch"] = max(self.stats.extra.get("largest_batch", 0), len(batch))
            try:
                self._run(batch)
            except BaseException as exc:  # report to every waiting request; keep serving the others
                log.exception("transformers engine %s: batch failed", self.name)
                for j in batch:
                    j.emit(exc)
                if not isinstance(exc, Exception):
                    raise  # a fatal error ends this thread; the next request starts another (_ensure_worker)

    def _run(self, batch: list[_Job]) -> None:
        params = batch[0].params
        if params.seed is not None and params.n > 1:
            # Sample i of a seeded request uses seed + i, like vLLM: one call per sample.
            rows = [_Row(batch[0], i) for i in range(params.n)]
            for i, row in enumerate(rows):
                self._generate(batch, [row], n=1, seed=params.seed + i)
        else:
            rows = [_Row(job, i) for job in batch for i in range(params.n)]
            self._generate(batch, rows, n=params.n, seed=params.seed)
        now = time.perf_counter()
        for job in batch:
            mine = [r for r in rows if r.job is job]
            job.emit(Generation(
                model=self.name,
                completions=tuple(Completion(r.index, r.sent, len(r.ids), r.finish or "length") for r in mine),
                prompt_tokens=len(job.prompt_ids),
                cached_prompt_tokens=0,
                ttft_s=job.ttft,
                total_s=now - job.submitted,
            ))

    def _generate(self, batch: list[_Job], rows: list[_Row], *, n: int, seed: int | None) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        params = batch[0].params
        tok = self._tokenizer
        eos = _eos_ids(self._model, tok)
        width = max(len(j.prompt_ids) for j in batch)
        input_ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for b, job in enumerate(batch):  # left padding: every prompt ends at the last column
            input_ids[b, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            attention[b, width - len(job.prompt_ids):] = 1
        device = self._model.device
        engine = self

        class RowStreamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first puts the prompt ids
                    self.prompt_seen = True
                    return
                for row, token in zip(rows, value.reshape(-1).tolist(), strict=True):
                    if row.finish is None:
                        engine._advance(row, token, eos, params)

            def end(self) -> None:
                for row in rows:
                    if row.finish is None:
                        row.finish = "length"
                        row.job.emit(Delta(row.index, "", "length"))

        class RowsDone(StoppingCriteria):
            def __call__(self, ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.tensor([r.finish is not None or r.job.cancelled for r in rows], device=ids.device)

        if seed is not None:
            torch.manual_seed(seed)
        sampling = params.temperature > 0
        with torch.inference_mode():
            self._model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=params.max_tokens,
                do_sample=sampling,
                temperature=params.temperature if sampling else None,
                top_p=params.top_p if sampling else None,
                top_k=None,
                num_return_sequences=n,
                pad_token_id=tok.pad_token_id,
                eos_token_id=sorted(eos),
                streamer=RowStreamer(),
                stopping_criteria=StoppingCriteriaList([RowsDone()]),
            )

    def _advance(self, row: _Row, token: int, eos: set[int], params: SamplingParams) -> None:
        """Add one sampled token to a row and send the text that became final."""
        job = row.job
        if job.ttft is None:
            job.ttft = time.perf_counter() - job.submitted
        if token in eos:
            row.finish = "stop"
            job.emit(Delta(row.index, "", "stop"))
            return
        row.ids.append(token)
        text = self._tokenizer.decode(row.ids, skip_special_tokens=True)
        for stop in params.stop:
            cut = text.find(stop)
            if cut != -1:
                text, row.finish = text[:cut], "stop"
        if text.endswith("\ufffd") and row.finish is None:
            return  # an incomplete UTF-8 sequence: wait for the next token
        if len(row.ids) >= params.max_tokens and row.finish is None:
            row.finish = "length"
        new = text[len(row.sent):] if text.startswith(row.sent) else ""
        row.sent = text if text.startswith(row.sent) else row.sent
        if new or row.finish:
            job.emit(Delta(row.index, new, row.finish))


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids
