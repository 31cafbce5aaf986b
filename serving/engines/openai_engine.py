"""An already-running OpenAI-compatible server (a remote vLLM, typically) as an engine.

This is the scale-out path: models that live on other machines, each served by
vLLM with its own tensor/pipeline parallelism. Requests always stream, so time to
first token is measured the same way as for local engines; cancelling the task
closes the HTTP connection, and vLLM aborts a request whose client went away.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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
from serving.models.registry import ModelSpec

log = logging.getLogger(__name__)

_ids = itertools.count()


class OpenAIEngine(StreamingEngine):
    def __init__(self, spec: ModelSpec) -> None:
        assert spec.endpoint is not None
        self.name = spec.name
        self.spec = spec
        self.endpoint = spec.endpoint
        self.served_model = spec.endpoint.model or spec.name
        self.stats = EngineStats()
        self._client: Any = None

    async def start(self) -> None:
        from openai import AsyncOpenAI

        key = os.environ.get(self.endpoint.api_key_env, "") if self.endpoint.api_key_env else ""
        if self.endpoint.api_key_env and not key:
            raise EngineError(
                f"model {self.name!r}: environment variable {self.endpoint.api_key_env} (api_key_env) is not set"
            )
        self._client = AsyncOpenAI(base_url=self.endpoint.base_url, api_key=key or "none",
                                   timeout=self.endpoint.timeout_s, max_retries=0)
        try:
            models = await self._client.models.list()
        except Exception as exc:
            await self.close()
            raise EngineError(
                f"model {self.name!r}: the server at {self.endpoint.base_url} does not answer "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        served = [m.id for m in models.data]
        if self.served_model not in served:
            await self.close()
            raise EngineError(
                f"model {self.name!r}: the server at {self.endpoint.base_url} serves {served}, not "
                f"{self.served_model!r}; set endpoint.model in models.yaml"
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def top1_tokens(self, token_ids: Sequence[int], start: int) -> list[int]:
        """The server's argmax at positions start.. of `token_ids` (vLLM's `prompt_logprobs`; known-answer check)."""
        from openai import APIConnectionError, APIStatusError

        if self._client is None:
            raise EngineError(f"model {self.name!r}: engine is not started")
        if not self.endpoint.vllm_extensions:
            raise EngineError(f"model {self.name!r}: per-position tokens need vLLM's prompt_logprobs "
                              "(endpoint.vllm_extensions is off)")
        try:
            out = await self._client.completions.create(
                model=self.served_model, prompt=list(token_ids), max_tokens=1, temperature=0,
                extra_body={"prompt_logprobs": 1})
        except (APIStatusError, APIConnectionError) as exc:
            raise EngineError(f"model {self.name!r} at {self.endpoint.base_url}: {_message(exc)}") from exc
        ranked = (out.choices[0].model_extra or {}).get("prompt_logprobs")
        if not ranked:
            raise EngineError(f"model {self.name!r}: the server at {self.endpoint.base_url} returned no "
                              "prompt_logprobs (not a vLLM server?)")
        return [int(next(token for token, lp in ranked[pos].items() if lp["rank"] == 1))
                for pos in range(start, len(token_ids))]

    async def greedy_tokens(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """The server's own greedy continuation of `token_ids` as token ids (vLLM's `return_token_ids`;
        the known-answer check's decode half)."""
        from openai import APIConnectionError, APIStatusError

        if self._client is None:
            raise EngineError(f"model {self.name!r}: engine is not started")
        if not self.endpoint.vllm_extensions:
            raise EngineError(f"model {self.name!r}: decoded token ids need vLLM's return_token_ids "
                              "(endpoint.vllm_extensions is off)")
        try:
            out = await self._client.completions.create(
                model=self.served_model, prompt=list(token_ids), max_tokens=max_tokens, temperature=0,
                extra_body={"return_token_ids": True})
        except (APIStatusError, APIConnectionError) as exc:
            raise EngineError(f"model {self.name!r} at {self.endpoint.base_url}: {_message(exc)}") from exc
        ids = (out.choices[0].model_extra or {}).get("token_ids")
        if ids is None:
            raise EngineError(f"model {self.name!r}: the server at {self.endpoint.base_url} returned no "
                              "token_ids (not a vLLM server?)")
        return [int(t) for t in ids]

    async def _opened(self, open_stream: Callable[[], Awaitable[Any]]) -> Any:
        """The stream, opened; a refused connection or a 502/503/504 (a server restarting, a proxy without a
        backend) is retried with jittered exponential backoff (tenacity), as nothing has been generated yet.
        Not the openai client's own retries: those also repeat timeouts, 429s and 500s, and keep no count."""
        from openai import APIConnectionError, APIStatusError, APITimeoutError
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

        def transient(exc: BaseException) -> bool:
            return (isinstance(exc, APIConnectionError) and not isinstance(exc, APITimeoutError)) or \
                (isinstance(exc, APIStatusError) and exc.status_code in (502, 503, 504))

        def counted(state) -> None:
            log.warning("model %s: %s; retry %d of %d in %.1f s", self.name, _message(state.outcome.exception()),
                        state.attempt_number, self.endpoint.retries, state.next_action.sleep)
            self.stats.extra["retries"] = self.stats.extra.get("retries", 0) + 1

        backoff = self.endpoint.retry_backoff_s
        async for attempt in AsyncRetrying(stop=stop_after_attempt(self.endpoint.retries + 1), reraise=True,
                                           retry=retry_if_exception(transient), before_sleep=counted,
                                           wait=wait_exponential_jitter(initial=backoff, jitter=backoff)):
            with attempt:
                return await open_stream()
        raise AssertionError("unreachable")

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                     request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        from openai import APIConnectionError, APIStatusError, BadRequestError

        if self._client is None:
            raise EngineError(f"model {self.name!r}: engine is not started")
        validate_messages(messages)
        body: dict[str, Any] = {"return_token_ids": True} if self.endpoint.vllm_extensions else {}
        texts = [""] * params.n
        token_counts: list[int | None] = [0 if self.endpoint.vllm_extensions else None] * params.n
        reasons: list[str | None] = [None] * params.n
        usage: Any = None
        started = time.perf_counter()
        ttft: float | None = None
        self.stats.begin()
        outcome = "error"
        try:
            common = dict(
                model=self.served_model, n=params.n, temperature=params.temperature, top_p=params.top_p,
                max_tokens=params.max_tokens, seed=params.seed, stop=list(params.stop) or None, stream=True,
                stream_options={"include_usage": True}, extra_body=body or None,
                extra_headers={"X-Request-Id": request_id} if request_id else None,
            )
            if isinstance(messages, str):  # a raw prompt: the server's /v1/completions
                stream = await self._opened(lambda: self._client.completions.create(prompt=messages, **common))
            else:
                schema = params.json_schema
                stream = await self._opened(lambda: self._client.chat.completions.create(
                    messages=list(messages),
                    response_format=({"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
                                     if schema else None),
                    **common,
                ))
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        i = choice.index
                        delta = getattr(choice, "delta", None)
                        text = (delta.content or "" if delta else "") if hasattr(choice, "delta") else choice.text
                        ids = getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")
                        if ttft is None and (text or ids):
                            ttft = time.perf_counter() - started
                        texts[i] += text
                        if ids is not None and token_counts[i] is not None:
                            token_counts[i] += len(ids)
                        if choice.finish_reason is not None:
                            reasons[i] = choice.finish_reason
                        if text or choice.finish_reason is not None:
                            yield Delta(i, text, finish_reason(choice.finish_reason))
            outcome = "finished"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "aborted"  # leaving `async with stream` closed the connection: the server aborts
            raise
        except BadRequestError as exc:
            raise InvalidRequest(f"model {self.name!r}: the server rejected the request: {_message(exc)}") from exc
        except (APIStatusError, APIConnectionError) as exc:
            raise EngineError(f"model {self.name!r} at {self.endpoint.base_url}: {_message(exc)}") from exc
        finally:
            self.stats.end(outcome)
        completion_total = usage.completion_tokens if usage else None
        counts = _per_choice_tokens(token_counts, texts, completion_total)
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        yield Generation(
            model=self.name,
            completions=tuple(
                Completion(i, texts[i], counts[i], finish_reason(reasons[i]) or "stop") for i in range(params.n)
            ),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            cached_prompt_tokens=(getattr(details, "cached_tokens", None) or 0) if details else 0,
            ttft_s=ttft,
            total_s=time.perf_counter() - started,
        )


def _per_choice_tokens(counted: list[int | None], texts: list[str], total: int | None) -> list[int]:
    """Exact counts when the server returned token ids (vLLM); otherwise split the usage total.

    A generic OpenAI server reports only the total over all n choices; the split by
    text length is an estimate, but the total stays exact.
    """
    if all(c is not None for c in counted) and (total is None or sum(counted) == total or sum(counted) > 0):
        return [int(c) for c in counted]
    if total is None:
        return [0] * len(texts)
    if len(texts) == 1:
        return [total]
    lengths = [max(len(t), 1) for t in texts]
    shares = [total * n // sum(lengths) for n in lengths]
    shares[0] += total - sum(shares)
    return shares


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(exc)
