"""Handlers of the steps that call engines: propose, synthesize, aggregate(-seq), refine, rank, vote
(adaptive and route, the cascade: moa/cascade.py).

The rules live here: n-collapsing of a repeated proposer into one n=k request with
seeds seed+i, quorum with engine-side aborts, min_success, reference budgets in the
model's own tokens, and which call of the last step streams the final answer.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Sequence

from moa.calls import CallFailed
from moa.code_checks import reference_text
from moa.context import LayerFailed, Response, StepContext, handles
from moa.engine import ChatMessage
from moa.prompts import RANK_INSTRUCTION, REFINE_INSTRUCTION, VOTE_INSTRUCTION, build_messages, fit_references, strategy
from moa.steps import (
    Aggregate,
    AggregateSeq,
    LLMStep,
    Propose,
    Rank,
    Refine,
    Synthesis,
    Synthesize,
    Vote,
)


@handles(Propose)
async def propose(ctx: StepContext, step: Propose, current: list[Response]) -> list[Response]:
    if step.unless_passing and current:  # escalation after a check: only where one failed, keeping what was there
        if not any(r.checks is not None and r.checks.total for r in current):
            ctx.note("nothing was checked (the conversation has no examples to run): no more samples")
            return current
        passing = [r for r in current if r.checks is not None and r.checks.all_passed]
        if passing:
            ctx.note(f"{len(passing)} response(s) pass every check: no more samples")
            return current
        try:
            return current + await _propose(ctx, step)
        except LayerFailed as exc:  # the escalation failed (timeout, spending limit): what was there stands
            ctx.failures.extend(exc.failures)
            ctx.note(f"no more samples ({exc}); the responses before it stand")
            return current
    return await _propose(ctx, step)


async def _propose(ctx: StepContext, step: Propose) -> list[Response]:
    requests: list[tuple[str, int, float, str | None, int | None]] = []  # model, n, temperature, role, seed
    seed = ctx.base_seed(step)
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
            role = step.role_prompts[sample % len(step.role_prompts)] if step.role_prompts else None
            requests.append((model, 1, step.sample_temperature(sample), role,
                             None if seed is None else seed + sample))
            sample += 1

    def messages_for(role: str | None) -> list[ChatMessage]:
        system = step.prompt if role is None else role
        return list(ctx.conversation) if system is None else build_messages(ctx.conversation, system, [], "before")

    one_request_quorum = step.quorum if len(requests) == 1 else None

    async def one(model: str, n: int, temperature: float, role: str | None, seed: int | None) -> list[Response]:
        params = ctx.params(step, n=n, temperature=temperature, seed=seed)
        generation = await ctx.generation(step, model, messages_for(role), params, need=one_request_quorum,
                                          essential=ctx.index == 0)
        return [Response(c.text, model, step.kind, ctx.layer, origin=(generation.call, c.index))
                for c in generation.completions]

    tasks = [asyncio.create_task(one(*request)) for request in requests]
    return await gather_layer(ctx, tasks, quorum=step.quorum, min_success=step.min_success)


async def gather_layer(ctx: StepContext, tasks: list[asyncio.Task], *, quorum: int | None,
                       min_success: int) -> list[Response]:
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
                except CallFailed as exc:
                    failures.append(str(exc))
            if quorum is not None and sum(map(len, results.values())) >= quorum and pending:
                ctx.note(f"quorum {quorum} reached: aborted {len(pending)} pending call(s)")
                break
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    ctx.failures.extend(failures)
    # References keep the pipeline's model order, not completion order: prompts stay reproducible.
    responses = [r for task in tasks if task in results for r in results[task]]
    if quorum is not None:
        responses = responses[:quorum]
    if len(responses) < min_success:
        raise LayerFailed(f"{len(responses)} of at least {min_success} responses succeeded", failures)
    return responses


REFERENCE_LABELS = {"propose": "a proposed answer", "synthesize": "a revised answer",
                    "critique": "a critique of the answers"}


def references(ctx: StepContext, step: Synthesis, model: str, responses: Sequence[Response]) -> list[str]:
    fitted, notes = fit_references([reference_text(r) for r in responses], step.budget,
                                   lambda text: ctx.calls.count_tokens(model, text))
    ctx.record.notes.extend(f"{model}: {n}" for n in notes)
    return fitted


async def synthesize_one(ctx: StepContext, step: Synthesis, model: str, responses: Sequence[Response], *,
                         writes_answer: bool) -> Response:
    """One model writes from the references; `writes_answer`: this call's text is the final answer."""
    strat = strategy(step.strategy)
    kinds = [r.step for r in responses]  # references from several kinds of step (`inputs`) say which is which
    labels = [REFERENCE_LABELS.get(k, f"from the {k} step") for k in kinds] if len(set(kinds)) > 1 else None
    messages = build_messages(ctx.conversation, step.prompt or strat.instruction,
                              references(ctx, step, model, responses), step.layout or strat.layout, labels)
    structured = strat.json_schema is not None
    params = ctx.params(step, seed=ctx.base_seed(step), json_schema=strat.json_schema)
    texts = await ctx.call(step, model, messages, params, stream_answer=writes_answer and not structured)
    if not structured:
        return Response(texts[0], model, step.kind, ctx.layer)
    data = parse_json_object(texts[0])
    return Response(data.get("final_answer") or texts[0], model, step.kind, ctx.layer, data)


@handles(Synthesize)
async def synthesize(ctx: StepContext, step: Synthesize, current: list[Response]) -> list[Response]:
    if strategy(step.strategy).only_last_reference:  # chain: each model improves the previous one's answer
        last: Response | None = None
        for i, model in enumerate(step.models):
            try:
                last = await synthesize_one(ctx, step, model, [last] if last else current[-1:],
                                            writes_answer=i == len(step.models) - 1)
            except CallFailed as exc:
                ctx.failures.append(str(exc))
        if last is None:
            raise LayerFailed("every model in the chain failed", [])
        return [last]
    single = len(step.models) == 1  # several writers: which one becomes the answer is known only at the end

    async def one(model: str) -> list[Response]:
        return [await synthesize_one(ctx, step, model, current, writes_answer=single)]

    tasks = [asyncio.create_task(one(model)) for model in step.models]
    return await gather_layer(ctx, tasks, quorum=step.quorum, min_success=step.min_success)


@handles(Aggregate)
async def aggregate(ctx: StepContext, step: Aggregate, current: list[Response]) -> list[Response]:
    try:
        return [await synthesize_one(ctx, step, step.model, current, writes_answer=True)]
    except CallFailed as exc:
        raise LayerFailed("the aggregator failed", [str(exc)]) from None


@handles(AggregateSeq)
async def aggregate_seq(ctx: StepContext, step: AggregateSeq, current: list[Response]) -> list[Response]:
    """Self-MoA-Seq: a sliding window over the samples, the running aggregate carried into each window."""
    running: Response | None = None
    chunks = [current[i:i + step.window] for i in range(0, len(current), step.window)]
    for i, chunk in enumerate(chunks):
        try:
            running = await synthesize_one(ctx, step, step.model, ([running] if running else []) + chunk,
                                           writes_answer=i == len(chunks) - 1)
        except CallFailed as exc:
            ctx.failures.append(str(exc))
            ctx.note(f"window {i + 1} failed; the running aggregate is kept")
    ctx.note(f"{len(chunks)} window(s) of up to {step.window} samples")
    if running is None:
        raise LayerFailed("every window failed", [])
    return [running]


@handles(Refine)
async def refine(ctx: StepContext, step: Refine, current: list[Response]) -> list[Response]:
    async def one(i: int, response: Response) -> list[Response]:
        model = step.models[i % len(step.models)]
        messages = build_messages(ctx.conversation, step.prompt or REFINE_INSTRUCTION, [response.text], "before")
        texts = await ctx.call(step, model, messages, ctx.params(step, seed=ctx.base_seed(step)))
        return [Response(texts[0], model, step.kind, ctx.layer)]

    tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(current)]
    return await gather_layer(ctx, tasks, quorum=None, min_success=1)


async def _judge(ctx: StepContext, step: LLMStep, instruction: str, current: list[Response]) -> list[int] | None:
    """The judge's reply as response indexes (0-based, without repeats); None if the judge failed."""
    messages = build_messages(ctx.conversation, step.prompt or instruction, [r.text for r in current], "before")
    try:
        reply = (await ctx.call(step, step.models_used()[0], messages,
                                ctx.params(step, seed=ctx.base_seed(step))))[0]
    except CallFailed as exc:
        ctx.failures.append(str(exc))
        ctx.note("judge failed; responses kept in their order")
        return None
    order = list(dict.fromkeys(int(x) - 1 for x in re.findall(r"\d+", reply) if 0 < int(x) <= len(current)))
    if not order:
        ctx.note(f"judge reply had no valid number ({reply[:60]!r}); first response kept")
    return order or [0]


@handles(Rank)
async def rank(ctx: StepContext, step: Rank, current: list[Response]) -> list[Response]:
    order = await _judge(ctx, step, RANK_INSTRUCTION, current)
    if order is None:
        return current[:step.k]
    order += [i for i in range(len(current)) if i not in order]
    ctx.note(f"ranking: {[i + 1 for i in order]}")
    return [current[i] for i in order[:step.k]]


@handles(Vote)
async def vote(ctx: StepContext, step: Vote, current: list[Response]) -> list[Response]:
    order = await _judge(ctx, step, VOTE_INSTRUCTION, current)
    if order is None:
        return current[:1]
    ctx.note(f"vote: response {order[0] + 1}")
    return [current[order[0]]]


def parse_json_object(text: str) -> dict:
    """A structured (council) reply; the raw text as the answer if the model did not write JSON."""
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else {"final_answer": text}
    except ValueError:
        return {"final_answer": text, "parse_error": "the model did not return valid JSON"}
