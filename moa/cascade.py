"""The cascade (`adaptive`, `route` steps): answer cheaply first, spend more only where that answer looks unsure.

`adaptive` asks one model; `route` lets a router (moa/routing.py) pick who answers first. Both then
climb the same ladder (`cascade`): greedy answers until one is sure or two agree, else samples of the
strongest model, else its synthesis (moa/handlers.py's `synthesize_one`).
"""

from __future__ import annotations

from collections.abc import Sequence

from moa.calls import CallFailed
from moa.context import LayerFailed, Response, StepContext, handles
from moa.engine import Completion
from moa.handlers import synthesize_one
from moa.routing import choose
from moa.steps import Adaptive, Cascade, Route
from moa.votes import normalize


@handles(Adaptive)
async def adaptive(ctx: StepContext, step: Adaptive, current: list[Response]) -> list[Response]:
    return await cascade(ctx, step, [step.model])


@handles(Route)
async def route(ctx: StepContext, step: Route, current: list[Response]) -> list[Response]:
    scorer = ctx.scorers.get(step.router)
    if scorer is None:
        raise LayerFailed(f"router {step.router!r} is not loaded (routers: in models.yaml)", [])
    models = step.models_used()  # in their order (cheapest first), a model swapped in twice counted once
    scores = await scorer.score(ctx.conversation, models)
    choice = choose(scores, models, scorer.threshold if step.min_score is None else step.min_score)
    ctx.note(f"route: {choice.why}")
    return await cascade(ctx, step, list(dict.fromkeys([choice.first, choice.strongest])))


async def cascade(ctx: StepContext, step: Cascade, ladder: list[str]) -> list[Response]:
    """Greedy answers down the ladder until one is sure or two agree; then samples of the last, then a synthesis.

    Nothing here streams: whether an answer is the final one is known only once it is complete.
    """
    conversation, seed = list(ctx.conversation), ctx.base_seed(step)
    answers: list[Response] = []
    for model in ladder:
        try:
            params = ctx.params(step, temperature=0.0, seed=seed, logprobs=True)
            first = (await ctx.generation(step, model, conversation, params, essential=not answers)).completions[0]
        except CallFailed as exc:
            if not answers and model == ladder[-1]:
                raise LayerFailed("the first answer failed", [*ctx.failures, str(exc)]) from None
            ctx.failures.append(str(exc))
            ctx.note(f"{model} did not answer ({exc.cause})")
            continue
        answer = Response(first.text, model, step.kind, ctx.layer)
        unsure = _unsure(first, step.min_logprob)
        if unsure is None:
            ctx.note(f"{model} sure: least likely token {first.min_logprob:.2f} >= {step.min_logprob}; "
                     f"stopped after {len(answers) + 1} call(s)")
            return [answer]
        if answers and _agreeing([answers[-1], answer], step) is not None:
            ctx.note(f"{model} unsure ({unsure}) but agrees with {answers[-1].model}: it stands")
            return [answer]
        ctx.note(f"{model} unsure ({unsure})")
        answers.append(answer)
    strongest, answer = ladder[-1], answers[-1]
    try:
        params = ctx.params(step, n=step.samples, seed=None if seed is None else seed + 1)
        texts = await ctx.call(step, strongest, conversation, params)
    except CallFailed as exc:
        ctx.failures.append(str(exc))
        ctx.note(f"no samples ({exc.cause}); {answer.model}'s answer stands")
        return [answer]
    samples = [Response(t, strongest, step.kind, ctx.layer) for t in texts]
    agreed = _agreeing([answer, *samples], step)
    if agreed is not None:
        ctx.note(f"{step.samples} samples of {strongest} agree with its answer ({agreed!r}): it stands")
        return [answer]
    keys = [normalize(r.text, step.agree) for r in [*answers, *samples]]
    ctx.note(f"answers {keys}: synthesized by {strongest}")
    try:
        return [await synthesize_one(ctx, step, strongest, [*answers, *samples], writes_answer=True)]
    except CallFailed as exc:
        ctx.failures.append(str(exc))
        ctx.note(f"the synthesis did not run ({exc.cause}); {answer.model}'s answer stands")
        return [answer]


def _agreeing(responses: Sequence[Response], step: Cascade) -> str | None:
    """The answer every response gives (normalised per `step.agree`), or None if they differ or give none."""
    keys = {normalize(r.text, step.agree) for r in responses}
    return next(iter(keys)) if len(keys) == 1 and None not in keys else None


def _unsure(completion: Completion, min_logprob: float) -> str | None:
    """Why a greedy answer needs a second opinion, or None when it does not."""
    if completion.finish_reason == "length":
        return "it ran out of tokens"
    if completion.min_logprob is None:
        return "the engine gives no log-probabilities"
    if completion.min_logprob < min_logprob:
        return f"least likely token {completion.min_logprob:.2f} < {min_logprob}"
    return None
