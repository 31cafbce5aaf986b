"""A scripted, deterministic engine that records every call: for orchestration tests and benchmarks.

Real-engine tests live beside these; this engine exists so that exact prompts,
reference order, n-collapsing, seeds and aborts can be asserted cheaply.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from moa.engine import (
    ChatMessage,
    Completion,
    Delta,
    EngineError,
    EngineStats,
    Generation,
    SamplingParams,
    StreamingEngine,
)


@dataclass
class Call:
    messages: list[ChatMessage]
    params: SamplingParams
    aborted: bool = False
    finished: bool = False


Reply = Callable[[list[ChatMessage], SamplingParams, int], str]


def default_reply(name: str) -> Reply:
    def reply(messages: list[ChatMessage], params: SamplingParams, i: int) -> str:
        return f"{name} answer {i}" + (f" seed {params.seed + i}" if params.seed is not None else "")

    return reply


@dataclass
class ScriptedEngine(StreamingEngine):
    name: str
    reply: Reply | None = None
    delay_s: float = 0.0  # per sample i: delay_s * (i + 1), so samples finish in index order
    delay: Callable[[SamplingParams, int], float] | None = None  # or seconds for sample i of a request
    min_logprob: float | None = None  # reported (with logprob = it x tokens) when a request asks for logprobs
    fail: str | None = None  # raise EngineError with this text
    fail_after: int | None = None  # with `fail`: raise it after this many words of the reply have streamed
    calls: list[Call] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def stream(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                     request_id: str | None = None) -> AsyncIterator[Delta | Generation]:
        call = Call([dict(m) for m in messages], params)
        self.calls.append(call)
        self.stats.begin()
        try:
            if self.fail and self.fail_after is None:
                raise EngineError(f"model {self.name!r}: {self.fail}")
            reply = self.reply or default_reply(self.name)
            texts = [reply(call.messages, params, i) for i in range(params.n)]
            delays = [self.delay(params, i) if self.delay else self.delay_s * (i + 1) for i in range(params.n)]
            order = sorted(range(params.n), key=lambda i: delays[i])
            elapsed = 0.0
            for i in order:
                wait = delays[i] - elapsed
                if wait > 0:
                    await asyncio.sleep(wait)
                    elapsed += wait
                for w, word in enumerate(texts[i].split(" ")):
                    if self.fail and w == self.fail_after:
                        raise EngineError(f"model {self.name!r}: {self.fail}")
                    yield Delta(i, word if w == 0 else " " + word)
                yield Delta(i, "", "stop")
            call.finished = True
        except (asyncio.CancelledError, GeneratorExit):
            call.aborted = True
            self.stats.end("aborted")
            raise
        except Exception:
            self.stats.end("error")
            raise
        self.stats.end("finished")
        prompt = sum(self.count_tokens(m["content"]) for m in messages)
        low = self.min_logprob if params.logprobs else None
        yield Generation(self.name, tuple(Completion(i, t, self.count_tokens(t), "stop",
                                                     None if low is None else low * self.count_tokens(t), low)
                                          for i, t in enumerate(texts)),
                         prompt_tokens=prompt, cached_prompt_tokens=0, ttft_s=0.0, total_s=0.0)
