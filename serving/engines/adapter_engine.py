"""One LoRA adapter of a running vLLM engine, served as a model of its own (BASE:ADAPTER).

Steps, the server, traces and benchmarks all address engines by model name; a view per adapter lets every one
of them name an adapter the same way, while the requests go to the one base engine, which batches the adapters
together (vLLM multi-LoRA). The view owns no process: closing it leaves the base engine running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from moa.engine import ChatMessage, EngineStats, Generation, SamplingParams, StreamEvent, StreamingEngine
from serving.models.adapters import target


class AdapterEngine(StreamingEngine):
    def __init__(self, base: Any, adapter: str) -> None:
        self.base = base  # a VLLMEngine with this adapter among its `adapters`
        self.adapter = adapter
        self.name = target(base.name, adapter)
        self.stats = EngineStats()  # this adapter's own requests (the base engine counts them too)

    async def start(self) -> None:
        await self.base.start()

    async def close(self) -> None:
        """Nothing to close: the base engine's owner closes it."""

    def count_tokens(self, text: str) -> int:
        return self.base.count_tokens(text)

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                     request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        self.base.lora_request(self.adapter)  # an adapter the engine lost says so before anything runs
        self.stats.begin()
        outcome = "error"
        try:
            async for event in self.base.stream(messages, params, request_id=request_id, adapter=self.adapter):
                yield replace(event, model=self.name) if isinstance(event, Generation) else event
            outcome = "finished"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "aborted"
            raise
        finally:
            self.stats.end(outcome)

    def __getattr__(self, attr: str) -> Any:
        """Everything else (tokenizer, context length, state, dtype, request validation) is the base engine's."""
        if attr.startswith("__") or attr == "base":
            raise AttributeError(attr)
        return getattr(self.base, attr)
