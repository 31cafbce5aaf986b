"""Run a pipeline on one conversation: steps in order, engine calls concurrent within a layer.

The runner owns the semantics the design asks for: n-collapsing of repeated
proposers into one engine request, per-sample seeds, quorum with engine-side
aborts, reference budgets, fault rules (timeouts, minimum successes, fallback to
the previous layer) and a trace of every call.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from moa.engine import (
    ChatMessage,
    Completion,
    Engine,
    Generation,
    InvalidRequest,
    SamplingParams,
    validate_messages,
)
from moa.prompts import (
    RANK_INSTRUCTION,
    REFINE_INSTRUCTION,
    VOTE_INSTRUCTION,
    build_messages,
    fit_references,
    strategy,
)
from moa.steps import (
    LLM_STEPS,
    Aggregate,
    AggregateSeq,
    Dropout,
    Filter,
    LLMStep,
    MajorityVote,
    Map,
    Pipeline,
    Propose,
    Rank,
    Refine,
    Sample,
    Shuffle,
    Step,
    Synthesize,
    Take,
    Vote,
    _Synthesis,
)
from moa.trace import AnswerDelta, CallFinished, CallRecord, Event, StepFinished, StepRecord, StepStarted, Trace, Usage
from moa.votes import majority

EventSink = Callable[[Event], Awaitable[None] | None]
Prices = Mapping[str, tuple[float, float]]  # model -> USD per million (prompt, completion) tokens


@dataclass(slots=True)
class Response:
    text: str
    model: str
    step: str
    layer: int
    data: dict | None = None  # structured output (council)


@dataclass(slots=True)
class RunResult:
    answer: str
    responses: list[list[Response]]  # after each step
    trace: Trace
    data: dict | None = None

    @property
    def usage(self) -> Usage:
        return self.trace.usage()


class PipelineError(RuntimeError):
    """Nothing usable came out; the message names each failed model and its cause."""


class _CallFailed(Exception):
    def __init__(self, model: str, cause: str) -> None:
        super().__init__(f"{model}: {cause}")
        self.model, self.cause = model, cause


@dataclass
class _Run:
    pipeline: Pipeline
    conversation: list[ChatMessage]
    engines: Mapping[str, Engine]
    prices: Prices
    on_event: EventSink | None
    seed: int | None
    timeout_s: float | None
    trace: Trace = field(init=False)
    layer: int = 0
    failures: list[str] = field(default_factory=list)
    final_step: int = -1

    def __post_init__(self) -> None:
        self.trace = Trace(self.pipeline.name)
        llm_steps = [i for i, s in enumerate(self.pipeline.steps) if isinstance(s, LLM_STEPS)]
        self.final_step = llm_steps[-1] if llm_steps else -1

    async def emit(self, event: Event) -> None:
        if self.on_event is not None:
            result = self.on_event(event)
            if inspect.isawaitable(result):
                await result

    # -- one engine call -----------------------------------------------------------------

    async def call(self, step: LLMStep, model: str, messages: list[ChatMessage], params: SamplingParams, *,
                   stream_answer: bool = False, need: int | None = None) -> list[str]:
        """One engine request; returns its completions' texts. With `need`, stop once that many finished."""
        engine = self.engines.get(model)
        record = CallRecord(step.kind, self.layer, model, params.n, self.trace.now())
        self.trace.calls.append(record)
        if engine is None:
            record.status, record.error, record.end_s = "error", "no engine for this model", self.trace.now()
            raise _CallFailed(model, "no engine for this model (not started)")
        timeout = step.timeout_s or self.timeout_s
        try:
            coro = self._consume(engine, messages, params, record, stream_answer, need)
            generation = await (asyncio.wait_for(coro, timeout) if timeout else coro)
        except TimeoutError:
            record.status, record.error = "timeout", f"no answer within {timeout} s (aborted)"
            raise _CallFailed(model, record.error) from None
        except asyncio.CancelledError:
            record.status = "aborted"
            raise
        except InvalidRequest:
            record.status = "error"
            raise
        except Exception as exc:  # engine errors: recorded, and the fault rules decide
            record.status, record.error = "error", f"{type(exc).__name__}: {exc}"
            raise _CallFailed(model, record.error) from exc
        else:
            record.status = "ok"
            record.prompt_tokens = generation.prompt_tokens
            record.completion_tokens = generation.completion_tokens
            record.cached_prompt_tokens = generation.cached_prompt_tokens
            prompt_price, completion_price = self.prices.get(model, (0.0, 0.0))
            record.cost_usd = (generation.prompt_tokens * prompt_price + generation.completion_tokens
                               * completion_price) / 1e6
        finally:
            record.end_s = self.trace.now()
            await self.emit(CallFinished(step.kind, self.layer, model, record.status,
                                         len(generation.completions) if record.status == "ok" else 0))
        return generation.texts

    async def _consume(self, engine: Engine, messages: list[ChatMessage], params: SamplingParams,
                       record: CallRecord, stream_answer: bool, need: int | None) -> Generation:
        started = self.trace.now()
        if not stream_answer and need is None:
            generation = await engine.generate(messages, params)
            record.ttft_s = generation.ttft_s
            return generation
        texts = [""] * params.n
        finished: list[int] = []
        stream = engine.stream(messages, params)
        try:
            async for event in stream:
                if isinstance(event, Generation):
                    return event
                if record.ttft_s is None and event.text:
                    record.ttft_s = self.trace.now() - started
                texts[event.index] += event.text
                if stream_answer and event.index == 0 and event.text:
                    await self.emit(AnswerDelta(event.text))
                if event.finish_reason is not None:
                    finished.append(event.index)
                    if need is not None and len(finished) >= need:
                        break  # quorum: closing the stream aborts the other samples in the engine
        finally:
            await stream.aclose()
        # The request was cut (quorum) before the engine's own counts arrived: count with its tokenizer.
        kept = tuple(sorted(finished))
        counts = [engine_count(engine, texts[i]) for i in kept]
        record.note = "quorum reached: the other samples were aborted; tokens re-counted without the template"
        prompt = sum(engine_count(engine, m["content"]) for m in messages)
        return Generation(engine.name, tuple(Completion(j, texts[i], counts[j], "stop") for j, i in enumerate(kept)),
                          prompt_tokens=prompt, cached_prompt_tokens=0, ttft_s=record.ttft_s,
                          total_s=self.trace.now() - started)

    def params(self, step: LLMStep, *, n: int = 1, temperature: float | None = None, seed: int | None = None,
               json_schema: dict | None = None) -> SamplingParams:
        return SamplingParams(n=n, temperature=step.temperature if temperature is None else temperature,
                              max_tokens=step.max_tokens, seed=seed, json_schema=json_schema)

    def base_seed(self, step: LLMStep) -> int | None:
        return step.seed if step.seed is not None else self.seed

    # -- LLM steps -------------------------------------------------------------------------

    async def propose(self, step: Propose, record: StepRecord) -> list[Response]:
        requests: list[tuple[str, int, float, str | None, int | None]] = []  # model, n, temperature, role, seed
        seed = self.base_seed(step)
        counts = Counter(step.models)
        sample = 0
        diverse = bool(step.temperature_offsets or step.role_prompts)
        for model in dict.fromkeys(step.models):
            k = counts[model] * step.samples
            if not diverse:  # one engine request with n=k: one prefill, shared KV blocks, seeds seed+i
                requests.append((model, k, step.temperature, None, None if seed is None else seed + sample))
                sample += k
                continue
            for _ in range(k):
                offset = step.temperature_offsets[sample % len(step.temperature_offsets)] \
                    if step.temperature_offsets else 0.0
                role = step.role_prompts[sample % len(step.role_prompts)] if step.role_prompts else None
                requests.append((model, 1, max(0.0, step.temperature + offset), role,
                                 None if seed is None else seed + sample))
                sample += 1
        if len(requests) > 1 and any(n > 1 and t == 0 for _, n, t, _, _ in requests):
            raise InvalidRequest(
                f"step propose: n > 1 samples of one model need temperature > 0 (got {step.temperature})")

        def messages_for(role: str | None) -> list[ChatMessage]:
            system = step.prompt if role is None else role
            if system is None:
                return list(self.conversation)
            return build_messages(self.conversation, system, [], "before")

        single_request_quorum = step.quorum if len(requests) == 1 else None

        async def one(model: str, n: int, temperature: float, role: str | None, seed: int | None) -> list[Response]:
            params = self.params(step, n=n, temperature=temperature, seed=seed)
            texts = await self.call(step, model, messages_for(role), params, need=single_request_quorum)
            return [Response(t, model, step.kind, self.layer) for t in texts]

        tasks = [asyncio.create_task(one(*request)) for request in requests]
        return await self.gather_layer(step, tasks, record, quorum=step.quorum, min_success=step.min_success)

    async def gather_layer(self, step: LLMStep, tasks: list[asyncio.Task], record: StepRecord, *,
                           quorum: int | None, min_success: int) -> list[Response]:
        """Collect a layer's calls; with a quorum, abort the stragglers once enough responses are in."""
        results: dict[asyncio.Task, list[Response]] = {}
        failures: list[str] = []
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    try:
                        results[task] = task.result()
                    except _CallFailed as exc:
                        failures.append(str(exc))
                if quorum is not None and sum(map(len, results.values())) >= quorum and pending:
                    record.notes.append(f"quorum {quorum} reached: aborted {len(pending)} pending call(s)")
                    break
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        self.failures.extend(failures)
        # References keep the pipeline's model order, not completion order: prompts stay reproducible.
        responses = [r for task in tasks if task in results for r in results[task]]
        if quorum is not None:
            responses = responses[:max(quorum, 1)] if len(responses) > quorum else responses
        if len(responses) < min_success:
            raise _LayerFailed(f"{len(responses)} of at least {min_success} responses succeeded", failures)
        return responses

    def references(self, step: _Synthesis, model: str, responses: Sequence[Response],
                   record: StepRecord) -> list[str]:
        engine = self.engines.get(model)
        texts = [r.text for r in responses]
        if engine is None:
            return texts
        fitted, notes = fit_references(texts, step.budget, lambda t: engine_count(engine, t))
        record.notes.extend(f"{model}: {n}" for n in notes)
        return fitted

    async def synthesize_one(self, step: _Synthesis, model: str, refs: Sequence[str], *,
                             stream_answer: bool) -> Response:
        strat = strategy(step.strategy)
        layout = step.layout or strat.layout
        messages = build_messages(self.conversation, step.prompt or strat.instruction, refs, layout)
        structured = strat.json_schema is not None
        texts = await self.call(step, model, messages,
                                self.params(step, seed=self.base_seed(step), json_schema=strat.json_schema),
                                stream_answer=stream_answer and not structured)
        text, data = texts[0], None
        if structured:
            data = parse_council(texts[0])
            text = data.get("final_answer") or texts[0]
            if stream_answer:
                await self.emit(AnswerDelta(text))
        return Response(text, model, step.kind, self.layer, data)

    async def synthesize(self, step: Synthesize, current: list[Response], record: StepRecord,
                         is_final: bool) -> list[Response]:
        if strategy(step.strategy).only_last_reference:  # chain: each model improves the previous one's answer
            out: list[Response] = []
            last = current
            for i, model in enumerate(step.models):
                try:
                    refs = self.references(step, model, last[-1:], record)
                    response = await self.synthesize_one(step, model, refs,
                                                         stream_answer=is_final and i == len(step.models) - 1)
                except _CallFailed as exc:
                    self.failures.append(str(exc))
                    continue
                out, last = [response], [response]
            if not out:
                raise _LayerFailed("every model in the chain failed", [])
            return out
        single = is_final and len(step.models) == 1

        async def one(model: str) -> list[Response]:
            refs = self.references(step, model, current, record)
            return [await self.synthesize_one(step, model, refs, stream_answer=single)]

        tasks = [asyncio.create_task(one(model)) for model in step.models]
        return await self.gather_layer(step, tasks, record, quorum=step.quorum, min_success=step.min_success)

    async def aggregate(self, step: Aggregate, current: list[Response], record: StepRecord,
                        is_final: bool) -> list[Response]:
        try:
            return [await self.synthesize_one(step, step.model, self.references(step, step.model, current, record),
                                              stream_answer=is_final)]
        except _CallFailed as exc:
            raise _LayerFailed("the aggregator failed", [str(exc)]) from None

    async def aggregate_seq(self, step: AggregateSeq, current: list[Response], record: StepRecord,
                            is_final: bool) -> list[Response]:
        """Self-MoA-Seq: a sliding window over the samples, the running aggregate carried into each window."""
        window = max(1, step.window)
        running: Response | None = None
        chunks = [current[i:i + window] for i in range(0, len(current), window)]
        for i, chunk in enumerate(chunks):
            refs = ([running] if running else []) + chunk
            try:
                running = await self.synthesize_one(
                    step, step.model, self.references(step, step.model, refs, record),
                    stream_answer=is_final and i == len(chunks) - 1)
            except _CallFailed as exc:
                self.failures.append(str(exc))
                record.notes.append(f"window {i + 1} failed; the running aggregate is kept")
        record.notes.append(f"{len(chunks)} window(s) of up to {window} samples")
        if running is None:
            raise _LayerFailed("every window failed", [])
        return [running]

    async def refine(self, step: Refine, current: list[Response], record: StepRecord) -> list[Response]:
        async def one(i: int, response: Response) -> list[Response]:
            model = step.models[i % len(step.models)]
            messages = build_messages(self.conversation, step.prompt or REFINE_INSTRUCTION, [response.text], "before")
            texts = await self.call(step, model, messages, self.params(step, seed=self.base_seed(step)))
            return [Response(texts[0], model, step.kind, self.layer)]

        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(current)]
        return await self.gather_layer(step, tasks, record, quorum=None, min_success=1)

    async def judge(self, step: Rank | Vote, current: list[Response], record: StepRecord) -> list[Response]:
        instruction = step.prompt or (RANK_INSTRUCTION if isinstance(step, Rank) else VOTE_INSTRUCTION)
        messages = build_messages(self.conversation, instruction, [r.text for r in current], "before")
        try:
            reply = (await self.call(step, step.model, messages, self.params(step, seed=self.base_seed(step))))[0]
        except _CallFailed as exc:
            self.failures.append(str(exc))
            record.notes.append("judge failed; responses kept in their order")
            return current[:step.k] if isinstance(step, Rank) else current[:1]
        order = [int(x) - 1 for x in re.findall(r"\d+", reply) if 0 < int(x) <= len(current)]
        order = list(dict.fromkeys(order))
        if not order:
            record.notes.append(f"judge reply had no valid number ({reply[:60]!r}); first response kept")
            order = [0]
        if isinstance(step, Rank):
            order += [i for i in range(len(current)) if i not in order]
            record.notes.append(f"ranking: {[i + 1 for i in order]}")
            return [current[i] for i in order[:step.k]]
        record.notes.append(f"vote: response {order[0] + 1}")
        return [current[order[0]]]

    # -- transforms ------------------------------------------------------------------------

    def transform(self, step: Step, current: list[Response], record: StepRecord, index: int) -> list[Response]:
        rng = random.Random((getattr(step, "seed", None) if getattr(step, "seed", None) is not None
                             else (self.seed or 0)) + index)
        if isinstance(step, Shuffle):
            out = list(current)
            rng.shuffle(out)
            return out
        if isinstance(step, Dropout):
            kept = [r for r in current if rng.random() >= step.rate]
            if not kept and current:
                kept = [rng.choice(current)]
                record.notes.append("dropout would drop everything: one response kept")
            return kept
        if isinstance(step, Sample):
            return rng.sample(current, min(step.k, len(current)))
        if isinstance(step, Take):
            return current[:step.k]
        if isinstance(step, Filter):
            pattern = re.compile(step.pattern) if step.pattern else None
            kept = [r for r in current if len(r.text.strip()) >= step.min_chars
                    and (pattern is None or pattern.search(r.text))]
            if not kept and current:
                record.notes.append("filter removed every response: previous responses kept")
                return current
            return kept
        if isinstance(step, Map):
            return [Response(apply_map(step.op, r.text), r.model, r.step, r.layer, r.data) for r in current]
        if isinstance(step, MajorityVote):
            winner, tally = majority([r.text for r in current], step.normalize)
            record.notes.append(f"votes: {dict(tally)}")
            return [current[winner]] if current else []
        raise TypeError(f"unknown step {step!r}")


class _LayerFailed(Exception):
    def __init__(self, reason: str, failures: list[str]) -> None:
        super().__init__(reason)
        self.failures = failures


def engine_count(engine: Engine, text: str) -> int:
    counter = getattr(engine, "count_tokens", None)
    return counter(text) if counter is not None else max(1, len(text) // 4)


def parse_council(text: str) -> dict:
    import json

    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else {"final_answer": text}
    except ValueError:
        return {"final_answer": text, "parse_error": "the model did not return valid JSON"}


def apply_map(op: str, text: str) -> str:
    if op == "strip":
        return text.strip()
    if op == "first_line":
        return text.strip().splitlines()[0] if text.strip() else ""
    if op == "final_answer":
        match = list(re.finditer(r"answer\s*(?:is\s*:?|:)\s*", text, re.IGNORECASE))
        return text[match[-1].end():].strip() if match else text.strip()
    raise ValueError(f"unknown map op {op!r}")


async def run(pipeline: Pipeline, messages: Sequence[ChatMessage], engines: Mapping[str, Engine], *,
              prices: Prices | None = None, on_event: EventSink | None = None, seed: int | None = None,
              timeout_s: float | None = None) -> RunResult:
    """Run `pipeline` on a conversation; the answer continues it."""
    validate_messages(messages)
    if messages[-1]["role"] != "user":
        raise InvalidRequest("the conversation must end with a user message")
    state = _Run(pipeline, list(messages), engines, prices or {}, on_event, seed, timeout_s)
    current: list[Response] = []
    history: list[list[Response]] = []
    for index, step in enumerate(pipeline.steps):
        is_llm = isinstance(step, LLM_STEPS)
        if is_llm:
            state.layer += 1
        record = StepRecord(type(step).__name__.lower(), state.layer, state.trace.now(), inputs=len(current))
        state.trace.steps.append(record)
        await state.emit(StepStarted(record.step, state.layer))
        is_final = index == state.final_step
        try:
            if isinstance(step, Propose):
                current = await state.propose(step, record)
            elif not current and is_llm:
                raise _LayerFailed("no responses to work on (a step before this one produced none)", [])
            elif isinstance(step, Synthesize):
                current = await state.synthesize(step, current, record, is_final)
            elif isinstance(step, Aggregate):
                current = await state.aggregate(step, current, record, is_final)
            elif isinstance(step, AggregateSeq):
                current = await state.aggregate_seq(step, current, record, is_final)
            elif isinstance(step, Refine):
                current = await state.refine(step, current, record)
            elif isinstance(step, (Rank, Vote)):
                current = await state.judge(step, current, record)
            else:
                current = state.transform(step, current, record, index)
        except _LayerFailed as exc:
            state.failures.extend(exc.failures)
            record.notes.append(f"layer failed ({exc}); previous responses kept")
            if isinstance(step, Propose) or not current:
                record.end_s = state.trace.now()
                state.trace.total_s = state.trace.now()
                causes = "; ".join(state.failures) or str(exc)
                raise PipelineError(f"pipeline {pipeline.name!r} failed at step {index + 1} ({record.step}): "
                                    f"{exc}. Causes: {causes}") from None
        record.end_s = state.trace.now()
        record.outputs = len(current)
        history.append(list(current))
        await state.emit(StepFinished(record.step, state.layer, len(current), record.end_s - record.start_s))
    state.trace.total_s = state.trace.now()
    if not current:
        raise PipelineError(f"pipeline {pipeline.name!r} produced no response")
    return RunResult(current[0].text, history, state.trace, current[0].data)


async def iter_run(pipeline: Pipeline, messages: Sequence[ChatMessage], engines: Mapping[str, Engine],
                   **kwargs) -> AsyncIterator[Event | RunResult]:
    """`run` as an async stream: progress events, answer chunks, then the RunResult."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def work() -> RunResult:
        try:
            return await run(pipeline, messages, engines, on_event=queue.put_nowait, **kwargs)
        finally:
            queue.put_nowait(done)

    task = asyncio.create_task(work())
    try:
        while (item := await queue.get()) is not done:
            yield item
        yield await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
