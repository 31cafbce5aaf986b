"""Every preset end-to-end on real vLLM CPU engines with the embedded models.

The shipped presets aggregate with the 1.5B model; here it is swapped for the 0.5B
and outputs are capped, so the whole set runs in CI in a couple of minutes.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from moa.runner import run
from tests.conftest import FRANCE, QWEN_SMALL, SMALL

pytestmark = pytest.mark.vllm
SWAP = {"qwen2.5-coder-1.5b": QWEN_SMALL}
PRESETS = ["together-moa", "moa-lite", "moa", "self-moa", "self-moa-seq", "robust-moa", "pyramid", "council",
           "consensus", "best-of", "chain", "rank", "self-consistency", "adaptive-self-moa", "routed"]


@pytest.fixture(scope="module")
def pool(small_pool):
    return small_pool


@pytest.mark.parametrize("name", PRESETS)
async def test_preset_runs_end_to_end(registry, pool, name):
    pipeline = registry.pipeline(name).with_models(SWAP).with_max_tokens(200 if name == "council" else 24)
    result = await run(pipeline, FRANCE, pool, prices=registry.prices(), seed=7, scorers=registry.scorers())
    assert result.answer.strip(), result.trace.to_dict()
    assert len(result.trace.steps) == len(pipeline.steps)
    assert all(c.status == "ok" for c in result.trace.calls), [c.error for c in result.trace.calls]
    assert result.usage.completion_tokens > 0 and result.usage.prompt_tokens > 0
    json.dumps(result.trace.to_dict())
    PROMISES.get(name, lambda p, r: None)(pipeline, result)


def _self_moa(pipeline, result):
    propose = [c for c in result.trace.calls if c.step == "propose"]
    assert len(propose) == 1 and propose[0].n == 6  # six samples, one engine request
    assert len(result.responses[0]) == 6


def _council(pipeline, result):
    assert set(result.data) >= {"final_answer", "agreement", "disagreement", "follow_up_questions",
                                "confidence"}, result.data


def _robust(pipeline, result):
    """Shuffled (same responses, new order), then each dropped with probability 0.25 from the seeded draw."""
    proposals, shuffled, dropped = ([r.text for r in step] for step in result.responses[:3])
    assert sorted(shuffled) == sorted(proposals)
    rng = random.Random(7 + 2)  # the request's seed + the dropout step's position
    expected = [t for t in shuffled if rng.random() >= 0.25] or None
    assert dropped == expected if expected else len(dropped) == 1
    assert result.trace.steps[3].inputs == len(dropped)


def _rank(pipeline, result):
    note = next(n for n in result.trace.steps[1].notes if n.startswith("ranking: "))
    order = [int(x) for x in note.removeprefix("ranking: ").strip("[]").split(", ")]
    assert sorted(order) == [1, 2, 3, 4, 5]  # a full ranking, judge's picks first
    assert result.answer == result.responses[0][order[0] - 1].text


def _self_moa_seq(pipeline, result):
    folds = [c for c in result.trace.calls if c.step == "aggregate-seq"]
    assert len(folds) == 2 and folds[0].end_s <= folds[1].start_s  # 6 samples in windows of 3, one after another
    assert "2 window(s) of up to 3 samples" in result.trace.steps[1].notes


def _self_consistency(pipeline, result):
    assert not [c for c in result.trace.calls if c.step == "majority-vote"]  # a vote without an engine call
    assert result.answer in [r.text for r in result.responses[0]]
    assert any(n.startswith("votes: ") for n in result.trace.steps[1].notes)


def _chain(pipeline, result):
    links = [c for c in result.trace.calls if c.step == "synthesize"]
    assert [c.model for c in links] == list(pipeline.steps[1].models) and links[0].end_s <= links[1].start_s


def _layers(widths):
    def check(pipeline, result):
        assert [len(r) for r in result.responses] == widths

    return check


def _adaptive(pipeline, result):
    """One greedy call with log-probabilities; a second (n=3) only if unsure; a synthesis only if they disagree."""
    calls, note = result.trace.calls, result.trace.steps[0].notes[-1]
    assert calls[0].n == 1 and [c.n for c in calls[1:2]] in ([], [3])
    assert len(calls) == (1 if " sure:" in note else 2 if "agree" in note or "no samples" in note else 3), note


def _routed(pipeline, result):
    """The router's choice answers first; the likeliest model only if that one was unsure; samples, synthesis."""
    notes, calls = result.trace.steps[0].notes, result.trace.calls
    assert notes[0].startswith("route: predicted success smollm2-135m 0.") and calls[0].n == 1
    assert calls[0].model in notes[0].split("; ")[1] and len(calls) <= 4


PROMISES = {"adaptive-self-moa": _adaptive, "routed": _routed, "self-moa": _self_moa, "council": _council,
            "robust-moa": _robust,
            "rank": _rank, "self-moa-seq": _self_moa_seq, "self-consistency": _self_consistency, "chain": _chain,
            "together-moa": _layers([3, 3, 3, 1]), "pyramid": _layers([6, 2, 1]), "moa": _layers([2, 2, 1])}


async def test_synthesis_after_the_conversation_reuses_the_proposal_kv_cache(registry, pool):
    from moa.pipeline import Pipeline
    from moa.steps import Aggregate, Propose

    system = {"role": "system", "content": "You are a meticulous geography tutor. " * 40}
    convo = [system, *FRANCE]
    pipeline = Pipeline("cache", (Propose(models=(QWEN_SMALL,), max_tokens=16),
                                  Aggregate(model=QWEN_SMALL, layout="after", max_tokens=16)))
    result = await run(pipeline, convo, pool)
    aggregate = result.trace.calls[-1]
    assert aggregate.cached_prompt_tokens >= 256  # the shared system prompt + question came from the cache


async def test_adaptive_answers_once_when_sure_and_escalates_when_cut_short(pool):
    from moa.pipeline import Pipeline
    from moa.steps import Adaptive

    four = [{"role": "user", "content": "What is 2 + 2? Reply with the number only."}]
    sure = Pipeline("sure", (Adaptive(model=QWEN_SMALL, min_logprob=-50.0, max_tokens=64),))
    result = await run(sure, four, pool, seed=1)
    note = result.trace.steps[0].notes[-1]
    assert result.usage.engine_calls == 1 and " sure: least likely token -" in note, note
    assert -50.0 <= float(note.split("token ")[1].split(" ")[0]) <= 0
    essay = [{"role": "user", "content": "Write a long essay on the history of Paris."}]
    cut = Pipeline("cut", (Adaptive(model=QWEN_SMALL, max_tokens=3),))
    result = await run(cut, essay, pool, seed=1)
    assert [c.n for c in result.trace.calls] == [1, 3, 1]  # answer, 3 samples, synthesis (no numbers to agree on)
    assert "ran out of tokens" in result.trace.steps[0].notes[0] and result.answer.strip()


async def test_unsure_answer_with_agreeing_real_samples_stops_without_a_synthesis(pool):
    from moa.pipeline import Pipeline
    from moa.steps import Adaptive

    four = [{"role": "user", "content": "What is 2 + 2? Explain in one short sentence, then give the number."}]
    always_unsure = Adaptive(model=QWEN_SMALL, min_logprob=0.0, temperature=0.05, samples=2, max_tokens=64)
    result = await run(Pipeline("agree", (always_unsure,)), four, pool, seed=1)
    notes = result.trace.steps[0].notes
    assert [c.n for c in result.trace.calls] == [1, 2], notes  # the answer, 2 samples, no synthesis call
    assert "2 samples of" in notes[-1] and "agree with its answer ('4')" in notes[-1], notes


async def test_route_asks_the_models_the_real_router_picks(registry, pool):
    from moa.pipeline import Pipeline
    from moa.steps import Route
    from tests.conftest import SMALL

    scorers = registry.scorers()
    scores = await scorers["embedded"].score(FRANCE, [SMALL, QWEN_SMALL])
    likeliest = max(scores, key=scores.get)
    cheapest_first = Route(models=(SMALL, QWEN_SMALL), router="embedded", min_score=0.0, min_logprob=-50.0,
                           max_tokens=16)
    result = await run(Pipeline("cheap", (cheapest_first,)), FRANCE, pool, scorers=scorers)
    assert [c.model for c in result.trace.calls] == [SMALL]  # any prediction reaches 0: the cheapest, sure
    assert result.trace.steps[0].notes[0].startswith(f"route: predicted success {SMALL} {scores[SMALL]:.2f}")
    likeliest_first = Route(models=(SMALL, QWEN_SMALL), router="embedded", min_score=1.0, min_logprob=-50.0,
                            max_tokens=16)
    result = await run(Pipeline("likeliest", (likeliest_first,)), FRANCE, pool, scorers=scorers)
    assert [c.model for c in result.trace.calls] == [likeliest]


async def test_a_quorum_leaves_no_straggler_decoding_in_the_engine(pool):
    """n=4 in one request, quorum 1: once the first sample is in, the others are aborted inside the run."""
    from moa.pipeline import Pipeline
    from moa.steps import Propose

    engine = pool[QWEN_SMALL]
    prompt = [{"role": "user", "content": "Answer with one word, or write a long story if you prefer."}]
    step = Propose(models=(QWEN_SMALL,), samples=4, quorum=1, temperature=1.5, max_tokens=400)
    result = await run(Pipeline("first", (step,)), prompt, pool, seed=3)
    assert engine.running_requests == 0  # at once: aborted by the run, not whenever the stream is collected
    assert len(result.responses[0]) == 1 and "quorum reached" in (result.trace.calls[0].note or "")


async def test_calls_over_their_timeout_are_aborted_in_the_engine(pool):
    from moa.pipeline import Pipeline
    from moa.runner import PipelineError
    from moa.steps import Propose

    essay = [{"role": "user", "content": "Write a long essay on the history of Paris."}]
    slow = Pipeline("slow", (Propose(models=(SMALL, QWEN_SMALL), max_tokens=2000, temperature=0.0, timeout_s=2.0),))
    with pytest.raises(PipelineError, match="no answer within 2.0 s") as failed:
        await run(slow, essay, pool, seed=1)
    assert SMALL in str(failed.value) and QWEN_SMALL in str(failed.value)  # each model and its cause
    assert pool[SMALL].running_requests == 0 and pool[QWEN_SMALL].running_requests == 0


async def test_reference_budgets_are_counted_in_the_reading_models_own_tokens(pool):
    from moa.pipeline import Pipeline
    from moa.prompts import ReferenceBudget
    from moa.steps import Aggregate, Propose

    pipeline = Pipeline("budget", (Propose(models=(SMALL, QWEN_SMALL), max_tokens=64, temperature=0.0),
                                   Aggregate(model=QWEN_SMALL, max_tokens=8,
                                             budget=ReferenceBudget(per_reference=20, total=30))))
    essay = [{"role": "user", "content": "Write a long essay on the history of Paris."}]
    result = await run(pipeline, essay, pool, seed=1)  # 64-token proposals, over the 20-token cap
    trims = re.findall(r"reference (\d+) trimmed from (\d+) to (\d+) tokens", " ".join(result.trace.steps[1].notes))
    assert trims, result.trace.steps[1].notes
    for index, have, keep in trims:  # counted by the aggregator's tokenizer, capped per reference and in total
        assert int(have) == pool[QWEN_SMALL].count_tokens(result.responses[0][int(index) - 1].text)
        assert int(keep) <= 20
    assert sum(int(k) for _, _, k in trims) <= 30
