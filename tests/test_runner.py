"""The orchestrator's rules, asserted on a scripted engine that records every call."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from moa.pipeline import Pipeline
from moa.prompts import STRATEGIES, format_references
from moa.runner import Ceiling, PipelineError, iter_run, run
from moa.steps import (
    Adaptive,
    Aggregate,
    AggregateSeq,
    Propose,
    Rank,
    ReferenceBudget,
    Refine,
    Route,
    Synthesize,
    Vote,
)
from moa.testing import ScriptedEngine
from moa.trace import AnswerDelta, AnswerRestarted, CallFinished, StepFinished, StepNote, StepStarted
from moa.transform_steps import Dropout, Filter, MajorityVote, Map, Sample, Shuffle, Take

Q = [{"role": "user", "content": "What is 2 + 2?"}]


def engines(*names: str, **kwargs) -> dict[str, ScriptedEngine]:
    return {n: ScriptedEngine(n, **kwargs) for n in names}


def pipe(*steps) -> Pipeline:
    return Pipeline("test", tuple(steps))


async def test_repeated_model_is_one_request_with_n_and_seeds_per_sample():
    es = engines("a", "b")
    result = await run(pipe(Propose(models=("a", "a", "a", "b"), temperature=0.7)), Q, es, seed=10)
    assert [(c.params.n, c.params.seed) for c in es["a"].calls] == [(3, 10)]
    assert [(c.params.n, c.params.seed) for c in es["b"].calls] == [(1, 13)]  # samples are seeded 10..13
    assert [r.text for r in result.responses[0]] == [
        "a answer 0 seed 10", "a answer 1 seed 11", "a answer 2 seed 12", "b answer 0 seed 13"]
    assert es["a"].calls[0].messages == Q  # the conversation itself, untouched


async def test_samples_and_diversity_options():
    es = engines("a")
    await run(pipe(Propose(models=("a",), samples=4)), Q, es)
    assert [c.params.n for c in es["a"].calls] == [4]
    es = engines("a")
    await run(pipe(Propose(models=("a",), samples=3, temperature=0.5, temperature_offsets=(0.0, 0.2, 0.4),
                           role_prompts=("You are terse.", "You are careful."))), Q, es, seed=1)
    assert [c.params.n for c in es["a"].calls] == [1, 1, 1]
    assert [c.params.temperature for c in es["a"].calls] == pytest.approx([0.5, 0.7, 0.9])
    assert [c.params.seed for c in es["a"].calls] == [1, 2, 3]
    assert [c.messages[0]["content"] for c in es["a"].calls] == ["You are terse.", "You are careful.", "You are terse."]
    assert all(c.messages[1:] == Q for c in es["a"].calls)


async def test_aggregate_prompt_layout_before_and_after():
    es = engines("a", "b", "agg")
    before = await run(pipe(Propose(models=("a", "b")), Aggregate(model="agg", layout="before")), Q, es)
    msgs = es["agg"].calls[0].messages
    refs = format_references(["a answer 0", "b answer 0"])
    assert msgs == [{"role": "system", "content": f"{STRATEGIES['moa'].instruction}\n\n{refs}"}, *Q]
    assert before.answer == "agg answer 0"

    es = engines("a", "b", "agg")
    await run(pipe(Propose(models=("a", "b")), Aggregate(model="agg", layout="after")), Q, es)
    msgs = es["agg"].calls[0].messages
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    # Starts exactly like the proposal prompt, so the proposer's KV cache is reused.
    assert msgs[0]["content"].startswith(Q[0]["content"] + "\n\n" + STRATEGIES["moa"].instruction)
    assert msgs[0]["content"].endswith(refs)


async def test_existing_system_message_is_kept_first():
    es = engines("a", "agg")
    convo = [{"role": "system", "content": "Be brief."}, *Q]
    await run(pipe(Propose(models=("a",)), Aggregate(model="agg")), convo, es)
    assert es["agg"].calls[0].messages[0]["content"].startswith("Be brief.\n\n")
    assert es["a"].calls[0].messages == convo


async def test_reference_order_is_pipeline_order_not_completion_order():
    es = {"slow": ScriptedEngine("slow", delay_s=0.05), "fast": ScriptedEngine("fast"), "agg": ScriptedEngine("agg")}
    await run(pipe(Propose(models=("slow", "fast")), Aggregate(model="agg")), Q, es)
    content = es["agg"].calls[0].messages[0]["content"]
    assert content.index("slow answer") < content.index("fast answer")


async def test_reference_budget_trims_per_reference_and_in_total():
    long = " ".join(f"w{i}" for i in range(20))
    es = {"a": ScriptedEngine("a", reply=lambda m, p, i: long),
          "b": ScriptedEngine("b", reply=lambda m, p, i: "x " * 9 + "x"), "agg": ScriptedEngine("agg")}
    result = await run(pipe(Propose(models=("a", "b")),
                            Aggregate(model="agg", budget=ReferenceBudget(per_reference=12, total=11))), Q, es)
    content = es["agg"].calls[0].messages[0]["content"]
    # per reference: a 20 -> 12; total: 12 + 10 = 22 > 11, scaled by 0.5 -> 6 and 5
    assert "w5" in content and "w6" not in content and "…[truncated]" in content
    notes = result.trace.steps[1].notes
    assert notes == ["agg: reference 1 trimmed from 20 to 6 tokens", "agg: reference 2 trimmed from 10 to 5 tokens"]


async def test_quorum_across_requests_aborts_the_straggler_in_the_engine():
    es = {"a": ScriptedEngine("a"), "b": ScriptedEngine("b"), "slow": ScriptedEngine("slow", delay_s=5)}
    result = await run(pipe(Propose(models=("a", "slow", "b"), quorum=2)), Q, es)
    assert [r.model for r in result.responses[0]] == ["a", "b"]
    assert es["slow"].calls[0].aborted and es["slow"].stats.running == 0
    assert "quorum 2 reached: aborted 1 pending call(s)" in result.trace.steps[0].notes
    assert [c.status for c in result.trace.calls] == ["ok", "aborted", "ok"]


async def test_quorum_within_one_n_request_stops_the_remaining_samples():
    es = {"a": ScriptedEngine("a", delay_s=0.02)}
    result = await run(pipe(Propose(models=("a",), samples=5, quorum=2)), Q, es)
    assert [r.text for r in result.responses[0]] == ["a answer 0", "a answer 1"]
    assert es["a"].calls[0].params.n == 5 and es["a"].calls[0].aborted and not es["a"].calls[0].finished
    call = result.trace.calls[0]
    assert call.status == "ok" and call.completion_tokens == 6 and call.prompt_tokens > 0 and "quorum" in call.note


async def test_call_timeout_is_recorded_and_aborted():
    es = {"a": ScriptedEngine("a"), "slow": ScriptedEngine("slow", delay_s=5)}
    result = await run(pipe(Propose(models=("a", "slow"), timeout_s=0.05)), Q, es)
    assert [r.model for r in result.responses[0]] == ["a"]
    slow = [c for c in result.trace.calls if c.model == "slow"][0]
    assert slow.status == "timeout" and "0.05 s" in slow.error
    assert es["slow"].calls[0].aborted


async def test_min_success_failure_names_each_model_and_cause():
    es = {"a": ScriptedEngine("a"), "bad": ScriptedEngine("bad", fail="out of memory")}
    with pytest.raises(PipelineError) as err:
        await run(pipe(Propose(models=("a", "bad"), min_success=2)), Q, es)
    assert "step 1 (propose)" in str(err.value) and "bad: EngineError: model 'bad': out of memory" in str(err.value)


async def test_total_failure_is_a_clear_error():
    es = {"x": ScriptedEngine("x", fail="dead"), "y": ScriptedEngine("y", fail="gone")}
    with pytest.raises(PipelineError, match="x: .*dead.*y: .*gone|y: .*gone.*x: .*dead"):
        await run(pipe(Propose(models=("x", "y")), Aggregate(model="x")), Q, es)


async def test_failed_layer_keeps_previous_responses():
    es = {"a": ScriptedEngine("a"), "b": ScriptedEngine("b"), "bad": ScriptedEngine("bad", fail="boom")}
    result = await run(pipe(Propose(models=("a", "b")), Synthesize(models=("bad",)), Aggregate(model="bad")), Q, es)
    assert result.answer == "a answer 0"
    assert [len(r) for r in result.responses] == [2, 2, 2]
    assert any("layer failed" in n for n in result.trace.steps[1].notes)
    assert any("layer failed" in n for n in result.trace.steps[2].notes)
    assert sum(c.status == "error" for c in result.trace.calls) == 2


async def test_synthesize_layer_each_model_sees_all_references():
    es = engines("a", "b")
    result = await run(pipe(Propose(models=("a", "b")), Synthesize(models=("a", "b"), strategy="consensus")), Q, es)
    for name in ("a", "b"):
        content = es[name].calls[1].messages[0]["content"]
        assert content.startswith(STRATEGIES["consensus"].instruction)
        assert "a answer 0" in content and "b answer 0" in content
    assert [r.layer for r in result.responses[1]] == [2, 2]


async def test_chain_runs_in_order_each_seeing_only_the_previous_answer():
    es = {"a": ScriptedEngine("a"), "b": ScriptedEngine("b", reply=lambda m, p, i: "b improved"),
          "c": ScriptedEngine("c", reply=lambda m, p, i: "c improved")}
    result = await run(pipe(Propose(models=("a",)), Synthesize(models=("b", "c"), strategy="chain")), Q, es)
    assert "a answer 0" in es["b"].calls[0].messages[0]["content"]
    c_prompt = es["c"].calls[0].messages[0]["content"]
    assert "b improved" in c_prompt and "a answer 0" not in c_prompt
    assert result.answer == "c improved"


async def test_self_moa_seq_folds_windows_carrying_the_running_aggregate():
    es = {"a": ScriptedEngine("a"), "agg": ScriptedEngine("agg", reply=lambda m, p, i: f"fold{len(es['agg'].calls)}")}
    result = await run(pipe(Propose(models=("a",), samples=6), AggregateSeq(model="agg", window=3)), Q, es)
    first, second = (c.messages[0]["content"] for c in es["agg"].calls)
    assert all(f"a answer {i}" in first for i in range(3)) and "a answer 3" not in first
    assert "fold1" in second and all(f"a answer {i}" in second for i in range(3, 6))
    assert second.index("fold1") < second.index("a answer 3")
    assert result.answer == "fold2"


async def test_rank_and_vote_use_the_judges_numbers():
    es = {"a": ScriptedEngine("a"), "judge": ScriptedEngine("judge", reply=lambda m, p, i: "3, 1, 2")}
    result = await run(pipe(Propose(models=("a",), samples=3), Rank(model="judge", k=2)), Q, es)
    assert [r.text for r in result.responses[-1]] == ["a answer 2", "a answer 0"]
    es["judge"].reply = lambda m, p, i: "Answer 2 is the majority."
    result = await run(pipe(Propose(models=("a",), samples=3), Vote(model="judge")), Q, es)
    assert result.answer == "a answer 1"
    es["judge"].reply = lambda m, p, i: "none"
    result = await run(pipe(Propose(models=("a",), samples=3), Vote(model="judge")), Q, es)
    assert result.answer == "a answer 0" and "no valid number" in result.trace.steps[1].notes[0]


async def test_refine_rewrites_each_response_round_robin():
    es = {"a": ScriptedEngine("a"), "r1": ScriptedEngine("r1"), "r2": ScriptedEngine("r2")}
    result = await run(pipe(Propose(models=("a",), samples=3), Refine(models=("r1", "r2"))), Q, es)
    assert [r.model for r in result.responses[1]] == ["r1", "r2", "r1"]
    assert "a answer 1" in es["r2"].calls[0].messages[0]["content"]


async def test_majority_vote_keeps_the_most_common_answer_without_a_call():
    replies = ["So 2 + 2 = 4.", "It is 5", "The answer is 4.0", "four"]
    es = {"a": ScriptedEngine("a", reply=lambda m, p, i: replies[i])}
    result = await run(pipe(Propose(models=("a",), samples=4), MajorityVote(normalize="number")), Q, es)
    assert result.answer == "So 2 + 2 = 4." and len(es["a"].calls) == 1
    assert "votes: {'4': 2, '5': 1}" in result.trace.steps[1].notes


async def test_transforms():
    es = engines("a")
    base = Propose(models=("a",), samples=6)
    shuffled = await run(pipe(base, Shuffle(seed=3)), Q, es)
    again = await run(pipe(base, Shuffle(seed=3)), Q, es)
    assert [r.text for r in shuffled.responses[1]] == [r.text for r in again.responses[1]]
    assert sorted(r.text for r in shuffled.responses[1]) == sorted(r.text for r in shuffled.responses[0])
    dropped = await run(pipe(base, Dropout(rate=1.0, seed=1)), Q, es)
    assert len(dropped.responses[1]) == 1  # never everything
    assert len((await run(pipe(base, Sample(k=2, seed=0)), Q, es)).responses[1]) == 2
    assert [r.text for r in (await run(pipe(base, Take(k=2)), Q, es)).responses[1]] == ["a answer 0", "a answer 1"]
    kept = await run(pipe(base, Filter(pattern=r"answer [24]")), Q, es)
    assert [r.text for r in kept.responses[1]] == ["a answer 2", "a answer 4"]
    es["a"].reply = lambda m, p, i: f"  Working...\nThe answer is: {i}  "
    mapped = await run(pipe(Propose(models=("a",), samples=2), Map(op="final_answer")), Q, es)
    assert [r.text for r in mapped.responses[1]] == ["0", "1"]


async def test_council_uses_a_json_schema_and_returns_structure():
    verdict = {"final_answer": "4", "agreement": ["2+2=4"], "disagreement": [], "follow_up_questions": [],
               "confidence": 0.9}
    es = {"a": ScriptedEngine("a"), "chair": ScriptedEngine("chair", reply=lambda m, p, i: json.dumps(verdict))}
    events = []
    result = await run(pipe(Propose(models=("a",), samples=2), Aggregate(model="chair", strategy="council")), Q, es,
                       on_event=events.append)
    assert es["chair"].calls[0].params.json_schema["required"][0] == "final_answer"
    assert result.answer == "4" and result.data == verdict
    assert [e.text for e in events if isinstance(e, AnswerDelta)] == ["4"]  # the answer, not raw JSON


async def test_trace_usage_cost_and_events():
    es = engines("a", "b", "agg")
    events = []
    result = await run(pipe(Propose(models=("a", "b")), Aggregate(model="agg")), Q, es,
                       prices={"agg": (1.0, 2.0)}, on_event=events.append)
    calls = result.trace.calls
    assert [c.model for c in calls] == ["a", "b", "agg"]
    assert all(c.status == "ok" and c.end_s >= c.start_s and c.completion_tokens == 3 for c in calls)
    agg = calls[2]
    assert agg.cost_usd == pytest.approx((agg.prompt_tokens * 1.0 + agg.completion_tokens * 2.0) / 1e6)
    assert result.usage.engine_calls == 3 and result.usage.cost_usd == pytest.approx(agg.cost_usd)
    json.dumps(result.trace.to_dict())  # serialisable
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "StepStarted" and kinds[-1] == "StepFinished"
    finished = [e for e in events if isinstance(e, CallFinished)]
    assert [(e.model, e.status, e.responses) for e in finished] == [("a", "ok", 1), ("b", "ok", 1), ("agg", "ok", 1)]
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "agg answer 0"
    assert [e.layer for e in events if isinstance(e, (StepStarted, StepFinished))] == [1, 1, 2, 2]


async def test_iter_run_streams_events_then_the_result():
    es = engines("a", "agg")
    items = [item async for item in iter_run(pipe(Propose(models=("a",)), Aggregate(model="agg")), Q, es)]
    assert type(items[-1]).__name__ == "RunResult" and items[-1].answer == "agg answer 0"
    assert any(isinstance(i, AnswerDelta) for i in items)


async def test_bad_conversations_are_rejected():
    from moa.engine import InvalidRequest

    with pytest.raises(InvalidRequest):
        await run(pipe(Propose(models=("a",))), [], engines("a"))
    with pytest.raises(InvalidRequest, match="end with a user message"):
        await run(pipe(Propose(models=("a",))), [*Q, {"role": "assistant", "content": "4"}], engines("a"))


# -- adaptive: one greedy answer, escalation only where it looks unsure -----------------------------


def adaptive_engines(min_logprob, sample_reply):
    def reply(messages, params, i):
        if params.temperature == 0:
            return "The answer is 4"
        if "drafts" in (messages[0]["content"] if messages[0]["role"] == "system" else ""):
            return "Synthesized: 4"
        return sample_reply(i)

    return {"m": ScriptedEngine("m", reply=reply, min_logprob=min_logprob)}


async def test_adaptive_stops_at_one_call_when_the_greedy_answer_is_sure():
    es = adaptive_engines(-0.2, lambda i: "5")
    events = []
    result = await run(pipe(Adaptive(model="m", min_logprob=-1.0)), Q, es, on_event=events.append, seed=1)
    assert result.answer == "The answer is 4" and [c.params.temperature for c in es["m"].calls] == [0.0]
    assert es["m"].calls[0].params.logprobs and result.usage.engine_calls == 1
    assert any("m sure: least likely token -0.20" in n for n in result.trace.steps[0].notes)
    assert [e.text for e in events if isinstance(e, StepNote)] == result.trace.steps[0].notes  # decisions stream
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == result.answer


async def test_adaptive_unsure_but_agreeing_samples_keep_the_first_answer():
    es = adaptive_engines(-2.0, lambda i: f"I get {2 + 2} as well")
    result = await run(pipe(Adaptive(model="m", min_logprob=-1.0, samples=3)), Q, es, seed=1)
    assert result.answer == "The answer is 4" and result.usage.engine_calls == 2
    assert [c.params.n for c in es["m"].calls] == [1, 3] and es["m"].calls[1].params.seed == 2
    assert "3 samples of m agree with its answer" in result.trace.steps[0].notes[-1]


async def test_adaptive_unsure_and_disagreeing_samples_are_synthesized_and_streamed():
    es = adaptive_engines(-2.0, lambda i: f"It is {4 + i}")
    events = []
    result = await run(pipe(Adaptive(model="m", min_logprob=-1.0, samples=2)), Q, es, on_event=events.append)
    assert result.answer == "Synthesized: 4" and result.usage.engine_calls == 3
    synthesis = es["m"].calls[2].messages[0]["content"]
    assert all(t in synthesis for t in ("The answer is 4", "It is 4", "It is 5"))
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "Synthesized: 4"
    assert [c.step for c in result.trace.calls] == ["adaptive"] * 3


async def test_adaptive_escalates_without_log_probabilities_and_is_a_first_step():
    es = adaptive_engines(None, lambda i: "4")
    result = await run(pipe(Adaptive(model="m")), Q, es)
    assert result.usage.engine_calls == 2 and "no log-probabilities" in result.trace.steps[0].notes[-2]
    with pytest.raises(ValueError, match="log-probability"):
        Adaptive(model="m", min_logprob=0.5)


# -- route: a router picks who answers first; escalation to the likeliest model ------------------------


class FixedScorer:
    """Predictions set by the test (the real scorer: serving/routing, tested with its embedding)."""

    def __init__(self, scores: dict[str, float], threshold: float = 0.6) -> None:
        self.scores, self.threshold, self.asked = scores, threshold, []

    async def score(self, conversation, models):
        self.asked.append(list(models))
        return {m: self.scores[m] for m in models}


def route_engines(cheap_logprob, strong_logprob, cheap="The answer is 4", strong="The answer is 4",
                  sample=lambda i: f"It is {4 + i}"):
    def replies(greedy):
        def reply(messages, params, i):
            if "drafts" in (messages[0]["content"] if messages[0]["role"] == "system" else ""):
                return "Synthesized: 4"
            return greedy if params.temperature == 0 else sample(i)
        return reply

    return {"cheap": ScriptedEngine("cheap", reply=replies(cheap), min_logprob=cheap_logprob),
            "strong": ScriptedEngine("strong", reply=replies(strong), min_logprob=strong_logprob)}


ROUTE = Route(models=("cheap", "strong"), router="r", min_logprob=-1.0, samples=2)


async def test_route_asks_the_cheapest_model_predicted_to_succeed_and_stops_when_it_is_sure():
    es, scorer, events = route_engines(-0.1, -0.1), FixedScorer({"cheap": 0.7, "strong": 0.9}), []
    result = await run(pipe(ROUTE), Q, es, scorers={"r": scorer}, on_event=events.append)
    assert result.usage.engine_calls == 1 and len(es["cheap"].calls) == 1 and not es["strong"].calls
    notes = result.trace.steps[0].notes
    assert notes[0] == "route: predicted success cheap 0.70, strong 0.90; cheap is the cheapest at >= 0.6"
    assert "cheap sure" in notes[1] and scorer.asked == [["cheap", "strong"]]
    assert [e.text for e in events if isinstance(e, StepNote)] == notes


async def test_route_sends_a_query_no_model_is_predicted_to_answer_to_the_likeliest_ties_to_the_cheaper():
    es = route_engines(-0.1, -0.1)
    result = await run(pipe(ROUTE), Q, es, scorers={"r": FixedScorer({"cheap": 0.3, "strong": 0.5})})
    assert [c.model for c in result.trace.calls] == ["strong"]
    result = await run(pipe(replace(ROUTE, min_score=0.9)), Q, es,
                       scorers={"r": FixedScorer({"cheap": 0.5, "strong": 0.5})})
    assert [c.model for c in result.trace.calls] == ["cheap"]  # a tie: the cheaper one


async def test_route_escalates_an_unsure_cheap_answer_and_stops_when_the_two_models_agree():
    es = route_engines(-3.0, -3.0, cheap="I think 4", strong="Surely 4.0")
    result = await run(pipe(ROUTE), Q, es, scorers={"r": FixedScorer({"cheap": 0.7, "strong": 0.9})})
    assert [c.model for c in result.trace.calls] == ["cheap", "strong"] and result.answer == "Surely 4.0"
    assert "strong unsure (least likely token -3.00 < -1.0) but agrees with cheap" in result.trace.steps[0].notes[-1]


async def test_route_samples_the_likeliest_model_and_synthesizes_when_nobody_agrees():
    es = route_engines(-3.0, -3.0, cheap="I think 5", strong="It is 4")
    result = await run(pipe(ROUTE), Q, es, scorers={"r": FixedScorer({"cheap": 0.7, "strong": 0.9})})
    assert [(c.model, c.n) for c in result.trace.calls] == [("cheap", 1), ("strong", 1), ("strong", 2),
                                                            ("strong", 1)]
    assert result.answer == "Synthesized: 4"
    synthesis = es["strong"].calls[-1].messages[0]["content"]
    assert all(t in synthesis for t in ("I think 5", "It is 4", "It is 5"))  # both models' answers + samples
    assert "synthesized by strong" in result.trace.steps[0].notes[-1]


async def test_route_without_its_router_fails_with_the_router_name():
    with pytest.raises(PipelineError, match="router 'r' is not loaded"):
        await run(pipe(ROUTE), Q, route_engines(-0.1, -0.1))
    with pytest.raises(ValueError, match="`router` is required"):
        Route(models=("a",))


# -- the spending ceiling: optional work is skipped, the run still answers --------------------------------


async def test_a_token_ceiling_stops_escalation_and_the_first_answer_stands():
    es = adaptive_engines(-2.0, lambda i: f"It is {4 + i}")
    step = Adaptive(model="m", min_logprob=-1.0, samples=2, max_tokens=50)
    result = await run(pipe(step), Q, es, ceiling=Ceiling(tokens=60))
    assert result.answer == "The answer is 4" and len(es["m"].calls) == 1
    skipped = result.trace.calls[-1]
    assert skipped.status == "skipped" and "would pass max_total_tokens 60" in skipped.error
    assert "no samples (skipped: up to" in result.trace.steps[0].notes[-1]
    unlimited = await run(pipe(step), Q, adaptive_engines(-2.0, lambda i: f"It is {4 + i}"))
    assert unlimited.usage.engine_calls == 3


async def test_a_ceiling_skips_optional_layers_but_never_the_first_answer():
    es = engines("a", "b", "c")
    pipeline = pipe(Propose(models=("a", "b"), max_tokens=40), Synthesize(models=("a", "b"), max_tokens=40),
                    Aggregate(model="c", max_tokens=40))
    result = await run(pipeline, Q, es, ceiling=Ceiling(tokens=5))  # less than the proposals alone
    assert result.answer == "a answer 0" and [c.status for c in result.trace.calls] == ["ok"] * 2 + ["skipped"] * 3
    assert "layer failed" in result.trace.steps[1].notes[-1] and "layer failed" in result.trace.steps[2].notes[-1]
    roomy = await run(pipeline, Q, engines("a", "b", "c"), ceiling=Ceiling(tokens=10_000))
    assert roomy.usage.engine_calls == 5 and roomy.answer.startswith("c answer")


async def test_a_cost_ceiling_uses_the_prices():
    es = engines("a", "c")
    pipeline = pipe(Propose(models=("a",), max_tokens=10), Aggregate(model="c", max_tokens=10))
    prices = {"a": (0.0, 0.0), "c": (0.0, 1000.0)}  # c: $0.001 a completion token
    capped = await run(pipeline, Q, es, prices=prices, ceiling=Ceiling(cost_usd=0.005))  # worst case $0.01
    assert [c.status for c in capped.trace.calls] == ["ok", "skipped"] and "max_cost_usd" in capped.trace.calls[1].error
    allowed = await run(pipeline, Q, engines("a", "c"), prices=prices, ceiling=Ceiling(cost_usd=0.02))
    assert [c.status for c in allowed.trace.calls] == ["ok", "ok"]


async def test_an_answer_broken_off_mid_stream_is_restarted_with_the_fallback():
    es = engines("a", "c")
    es["c"].fail, es["c"].fail_after = "connection lost", 2  # the aggregator dies after streaming two words
    events = []
    result = await run(pipe(Propose(models=("a",)), Aggregate(model="c")), Q, es, on_event=events.append, seed=1)
    assert result.answer == "a answer 0 seed 1"  # the fault rules keep the proposal
    kinds = [type(e).__name__ for e in events if isinstance(e, AnswerDelta | AnswerRestarted)]
    assert kinds == ["AnswerDelta", "AnswerDelta", "AnswerRestarted", "AnswerDelta"]
    restart = next(e for e in events if isinstance(e, AnswerRestarted))
    assert restart.discarded == len("c answer") and "connection lost" in restart.reason
    after = events[events.index(restart) + 1:]
    assert "".join(e.text for e in after if isinstance(e, AnswerDelta)) == result.answer


async def test_streamed_calls_carry_every_sample_and_the_figures_the_trace_records():
    """`stream_calls`: each call's deltas rebuild its samples; call ids index the trace; quorum-cut samples never
    finish. This is what the playground's columns are drawn from (`moa.call_deltas`)."""
    from moa.trace import CallDelta, CallStarted

    es = {"a": ScriptedEngine("a", delay_s=0.01), "b": ScriptedEngine("b"), "agg": ScriptedEngine("agg")}
    steps = (Propose(models=("a", "a", "a"), temperature=0.7, quorum=2), Synthesize(models=("a", "b")),
             Aggregate(model="agg"))
    items = [i async for i in iter_run(pipe(*steps), Q, es, prices={"agg": (1.0, 2.0)}, stream_calls=True)]
    result = items[-1]
    started = {e.call: e for e in items if isinstance(e, CallStarted)}
    finished = {e.call: e for e in items if isinstance(e, CallFinished)}
    assert [(started[i].model, started[i].n) for i in sorted(started)] == [("a", 3), ("a", 1), ("b", 1), ("agg", 1)]
    assert sorted(finished) == sorted(started) == list(range(len(result.trace.calls)))
    text: dict[tuple[int, int], str] = {}
    done: set[tuple[int, int]] = set()
    for e in items:
        if isinstance(e, CallDelta):
            assert (e.call, e.index) not in done  # nothing after a sample's finish
            text[e.call, e.index] = text.get((e.call, e.index), "") + e.text
            if e.finish_reason:
                done.add((e.call, e.index))
    for call, record in enumerate(result.trace.calls):
        event = finished[call]
        assert (event.model, event.status, event.prompt_tokens, event.completion_tokens, event.cost_usd) == (
            record.model, record.status, record.prompt_tokens, record.completion_tokens, record.cost_usd)
        assert event.seconds == pytest.approx(record.end_s - record.start_s)
    # The quorum (2 of a's 3 samples in one request): the third sample never finished.
    assert {k for k in done if k[0] == 0} == {(0, 0), (0, 1)} and {(1, 0), (2, 0), (3, 0)} <= done
    assert [text[0, i] for i in (0, 1)] == [r.text for r in result.responses[0]]
    assert text[3, 0] == result.answer == "agg answer 0"
    assert "".join(e.text for e in items if isinstance(e, AnswerDelta)) == result.answer


async def test_without_stream_calls_no_call_deltas_are_emitted():
    from moa.trace import CallDelta, CallStarted

    es = engines("a", "agg")
    items = [i async for i in iter_run(pipe(Propose(models=("a",)), Aggregate(model="agg")), Q, es)]
    assert not any(isinstance(i, CallDelta) for i in items)
    assert sum(isinstance(i, CallStarted) for i in items) == 2


async def test_each_call_asks_for_priority_by_its_layer_so_later_layers_go_first():
    es = engines("a", "b", "agg")
    await run(pipe(Propose(models=("a", "b")), Synthesize(models=("a",)), Aggregate(model="agg")), Q, es)
    assert [c.params.priority for c in es["a"].calls] == [-1, -2]
    assert [c.params.priority for c in es["b"].calls] == [-1] and [c.params.priority for c in es["agg"].calls] == [-3]
