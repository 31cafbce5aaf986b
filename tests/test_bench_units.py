"""Benchmark and eval machinery on scripted engines: wrappers, levels, metrics, scorers, reports.

The real-engine runs of `moa bench` and `moa eval` are in test_bench_real.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from moa.engine import Generation, SamplingParams
from moa.pipeline import Pipeline
from moa.runner import run
from moa.steps import Aggregate, Propose
from moa.testing import ScriptedEngine
from serving.bench import report
from serving.bench.baselines import RecordedCall, Recording, Sequential, SplitN
from serving.bench.datasets import DatasetError, load_prompts, load_tasks
from serving.bench.evaluate import (
    System,
    accuracy_row,
    answer_tasks,
    judge_pairs,
    parse_verdict,
    resolve_system,
)
from serving.bench.measure import LevelResult, RequestSample, pipeline_request, replay, run_level, summarize
from serving.bench.scoring import chosen_letter, score_choice, score_exact, score_numeric, score_regex
from serving.bench.stats import percentile, wilson_interval
from serving.bench.suite import (
    PipelineBench,
    level_requests,
    parse_levels,
    samples_in_one_request,
    sequential_engines,
)

Q = [{"role": "user", "content": "What is 2 + 2?"}]
SELF_MOA = Pipeline("self", (Propose(models=("a",), samples=3, temperature=0.7, max_tokens=16),
                             Aggregate(model="a", max_tokens=16)))


# -- wrappers ---------------------------------------------------------------------------------


async def test_split_n_sends_k_single_requests_with_seeds_seed_plus_i():
    engine = ScriptedEngine("a")
    result = await SplitN(engine).generate(Q, SamplingParams(n=3, temperature=0.7, seed=10))
    assert [c.params.n for c in engine.calls] == [1, 1, 1]
    assert sorted(c.params.seed for c in engine.calls) == [10, 11, 12]
    assert [c.index for c in result.completions] == [0, 1, 2]
    assert result.texts == ["a answer 0 seed 10", "a answer 0 seed 11", "a answer 0 seed 12"]
    engine.min_logprob = -0.5  # what a child reports survives the merge (the adaptive step reads it)
    merged = await SplitN(engine).generate(Q, SamplingParams(n=2, temperature=0.7, logprobs=True))
    assert [c.min_logprob for c in merged.completions] == [-0.5, -0.5]


async def test_split_n_stream_merges_children_and_quorum_aborts_the_rest():
    engine = ScriptedEngine("a", delay=lambda params, i: 0.02 if params.seed in (10, 11) else 5.0)
    pipe = Pipeline("q", (Propose(models=("a",), samples=4, temperature=0.7, quorum=2),))
    result = await run(pipe, Q, {"a": SplitN(engine)}, seed=10)
    assert len(result.responses[0]) == 2
    assert len(engine.calls) == 4
    # By the time the run returns, the two children the quorum did not need were aborted, not left to finish.
    assert [(c.finished, c.aborted) for c in engine.calls] == [(True, False)] * 2 + [(False, True)] * 2
    assert (engine.stats.finished, engine.stats.aborted, engine.stats.running) == (2, 2, 0)


async def test_serialized_runs_one_call_at_a_time_across_engines():
    lock = asyncio.Lock()
    a, b = ScriptedEngine("a", delay_s=0.05), ScriptedEngine("b", delay_s=0.05)
    peak = 0

    async def watch():
        nonlocal peak
        for _ in range(20):
            peak = max(peak, a.stats.running + b.stats.running)
            await asyncio.sleep(0.01)

    engines = {"a": Sequential(a, lock), "b": Sequential(b, lock)}
    pipe = Pipeline("p", (Propose(models=("a", "b"), max_tokens=8),))
    await asyncio.gather(run(pipe, Q, engines), watch())
    assert peak == 1


async def test_sequential_baseline_runs_each_sample_of_an_n_k_request_alone():
    a, b = ScriptedEngine("a", delay_s=0.02), ScriptedEngine("b", delay_s=0.02)
    peak = 0
    pipe = Pipeline("p", (Propose(models=("a", "a", "b"), samples=2, temperature=0.7, max_tokens=8),
                          Aggregate(model="b")))
    task = asyncio.create_task(run(pipe, Q, sequential_engines({"a": a, "b": b})))
    while not task.done():
        peak = max(peak, a.stats.running + b.stats.running)
        await asyncio.sleep(0.005)
    result = await task
    assert peak == 1
    assert [c.params.n for c in a.calls] == [1, 1, 1, 1] and len(result.responses[0]) == 6


async def test_recording_then_replay_submits_the_same_calls():
    calls: list[RecordedCall] = []
    engine = ScriptedEngine("a")
    await run(SELF_MOA, Q, {"a": Recording(engine, calls)}, seed=1)
    assert [c.params.n for c in calls] == [3, 1]
    replayed = await replay(calls, {"a": engine})
    assert replayed.calls == 2 and replayed.completion_tokens > 0


# -- levels and metrics -----------------------------------------------------------------------


async def test_run_level_serves_each_request_once_within_the_concurrency():
    engine = ScriptedEngine("a", delay_s=0.02)
    seen = []

    async def request(i, t0):
        seen.append(i)
        return await pipeline_request(SELF_MOA, Q, {"a": engine}, i, t0, seed=i)

    level = await run_level("moa", "self", request, concurrency=3, requests=7)
    assert sorted(seen) == list(range(7)) and [s.index for s in level.samples] == list(range(7))
    assert all(s.ok and s.engine_calls == 2 and s.ttft_s is not None and s.ttft_s <= s.latency_s for s in level.samples)
    assert set(level.samples[0].layers) == {"L1 propose", "L2 aggregate"}
    assert samples_in_one_request(SELF_MOA)
    assert not samples_in_one_request(Pipeline("x", (Propose(models=("a", "b")),)))


class Drafting(ScriptedEngine):
    """Speculates as a vLLM engine with engine.speculative reports it: per completion, drafts made and accepted
    (here 4/1 for each proposal sample, 8/6 for the aggregate)."""

    async def stream(self, messages, params, *, request_id=None):
        async for event in super().stream(messages, params, request_id=request_id):
            if isinstance(event, Generation):
                drafted, accepted = (4, 1) if params.n > 1 else (8, 6)
                event = dataclasses.replace(event, completions=tuple(
                    dataclasses.replace(c, draft_tokens=drafted, accepted_draft_tokens=accepted)
                    for c in event.completions))
            yield event


async def test_draft_acceptance_is_traced_per_call_and_summarised_per_layer():
    async def request(i, t0):
        return await pipeline_request(SELF_MOA, Q, {"a": Drafting("a")}, i, t0, seed=i)

    level = await run_level("moa", "self", request, concurrency=2, requests=2)
    assert level.samples[0].drafts == {"L1 propose": [12, 3], "L2 aggregate": [8, 6]}  # 3 samples, then 1
    assert summarize(level)["draft_acceptance"] == {"L1 propose": 0.25, "L2 aggregate": 0.75}
    result = await run(SELF_MOA, Q, {"a": Drafting("a")})
    assert [(c.draft_tokens, c.accepted_draft_tokens) for c in result.trace.calls] == [(12, 3), (8, 6)]
    row = dict(zip([c[0] for c in report.LEVEL_COLUMNS], [f(summarize(level)) for _, f in report.LEVEL_COLUMNS],
                   strict=True))
    assert row["drafts accepted"] == "propose 25% · aggregate 75%"


def test_summarize_computes_throughput_and_percentiles():
    samples = [RequestSample(i, 0.0, latency_s=float(i + 1), ttft_s=0.5, answer_tokens=11, completion_tokens=40,
                             engine_calls=2) for i in range(4)]
    samples.append(RequestSample(4, 0.0, latency_s=9.0, error="EngineError: boom"))
    s = summarize(LevelResult("moa", "p", 4, 10.0, samples))
    assert s["requests"] == 5 and s["errors"] == 1 and s["first_error"] == "EngineError: boom"
    assert s["request_throughput"] == pytest.approx(0.4)
    assert s["output_tokens_per_s"] == pytest.approx(16.0)
    assert s["answer_tokens_per_s"] == pytest.approx(4.4)
    assert s["latency_s"]["p50"] == pytest.approx(2.5)
    assert s["tpot_s"]["p50"] == pytest.approx((2.5 - 0.5) / 10)


def test_percentile_and_wilson_interval():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    low, high = wilson_interval(28, 60)
    assert low < 28 / 60 < high and high - low < 0.26


def test_parse_levels():
    assert parse_levels("16, 1,4,4") == [1, 4, 16]
    with pytest.raises(ValueError, match="numbers separated by commas"):
        parse_levels("one")
    with pytest.raises(ValueError, match=">= 1"):
        parse_levels("0,2")


# -- scoring ---------------------------------------------------------------------------------


def test_levels_default_to_a_steady_state_and_the_report_says_which_are_not():
    assert [level_requests(None, c) for c in (1, 4, 8, 16)] == [16, 16, 24, 48]
    assert level_requests(10, 16) == 10  # as asked
    level = {"system": "moa", "latency_s": {"p90": 1.0}}
    entry = {"levels": [{**level, "concurrency": 4, "requests": 12}, {**level, "concurrency": 8, "requests": 16},
                        {"system": "sequential", "concurrency": 1, "requests": 2}],
             "comparison": [{"concurrency": 4, "efficiency_same_in_flight": None},
                            {"concurrency": 8, "efficiency_same_in_flight": 0.93}]}
    lines = report.target_lines(entry)
    assert lines[0] == "Efficiency (a′) at 8 clients: 0.93 — target ≥ 0.95: missed."
    assert "moa c=8 (16 requests)" in lines[1] and "c=4" not in lines[1] and "sequential" not in lines[1]
    entry["comparison"][1]["efficiency_same_in_flight"] = 0.97
    entry["levels"][1]["requests"] = 24
    assert report.target_lines(entry) == ["Efficiency (a′) at 8 clients: 0.97 — target ≥ 0.95: met.",
                                          "Every level ran at a steady state (≥ 3 requests per client)."]


def test_numeric_takes_the_final_answer_not_a_number_on_the_way():
    assert score_numeric("3 pens cost 2 dollars, so 12 pens cost 4 x 2.\nAnswer: 8", "8")
    assert score_numeric("The answer is $1,250.00", "1250")
    assert score_numeric("so \\boxed{8} in all", "8")
    assert not score_numeric("12 pens cost 8 dollars... wait, Answer: 9", "8")
    assert not score_numeric("no idea", "8")


def test_exact_choice_and_regex():
    assert score_exact("Answer: **Paris**", "paris") and score_exact("Paris.", "Paris")
    assert not score_exact("The capital of France is Paris.", "Paris")  # exact means exact: use regex for that
    assert score_regex("It was Shakespeare.", r"\bshakespeare\b")
    assert chosen_letter("A train is fast.\nSo the answer is (C).", "ABCD") == "C"
    assert chosen_letter("I pick option D", "ABCD") == "D"
    assert score_choice("It is Canberra.", "B", ["Sydney", "Canberra", "Perth", "Melbourne"])
    assert not score_choice("A) Stack\nB) Queue\nC) Tree", "B", ["Stack", "Queue", "Tree"])  # lists, no pick


# -- datasets ----------------------------------------------------------------------------------


def test_default_sets_load():
    tasks = load_tasks()
    assert len(tasks) >= 40 and {t.scorer for t in tasks} == {"numeric", "exact", "choice", "regex"}
    assert {t.category for t in tasks} == {"arithmetic", "factual", "multiple-choice"}
    assert len(load_prompts()) >= 20


def test_bad_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "1", "prompt": "x", "answer": "8", "scorer": "numeric"}\n{"id": "2", "prompt": "y"\n')
    with pytest.raises(DatasetError, match=r"t.jsonl:2: not valid JSON"):
        load_tasks(path)
    path.write_text('{"id": "1", "prompt": "x", "answer": "E", "scorer": "choice", "choices": ["a", "b"]}\n')
    with pytest.raises(DatasetError, match=r"t.jsonl:1: .*one of the letters A, B"):
        load_tasks(path)
    path.write_text('{"id": "1", "prompt": "x", "answer": "eight", "scorer": "numeric"}\n')
    with pytest.raises(DatasetError, match="not a number"):
        load_tasks(path)
    with pytest.raises(DatasetError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")


# -- eval --------------------------------------------------------------------------------------


def test_resolve_system_layouts_and_models(registry):
    s = resolve_system(registry, "self-moa@after", {"qwen2.5-coder-1.5b": "smollm2-135m"}, 32)
    assert s.pipeline.name == "self-moa@after" and s.pipeline.models() == ("smollm2-135m",)
    assert s.pipeline.steps[-1].layout == "after" and s.pipeline.steps[0].max_tokens == 32
    single = resolve_system(registry, "qwen2.5-coder-1.5b", {"qwen2.5-coder-1.5b": "smollm2-135m"}, None)
    assert single.pipeline.models() == ("qwen2.5-coder-1.5b",)  # --swap touches pipelines only
    with pytest.raises(ValueError, match="before or after"):
        resolve_system(registry, "self-moa@middle", {}, None)
    with pytest.raises(KeyError):
        resolve_system(registry, "no-such-thing", {}, None)


async def test_accuracy_and_pairwise_with_a_position_biased_judge(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "1", "prompt": "2+2?", "answer": "4", "scorer": "numeric"}\n'
                    '{"id": "2", "prompt": "3+3?", "answer": "6", "scorer": "numeric"}\n'
                    '{"id": "3", "prompt": "Say hi"}\n')
    tasks = load_tasks(path)
    four = ScriptedEngine("four", reply=lambda m, p, i: "Answer: 4")
    result = await answer_tasks(System("four", Pipeline("four", (Propose(models=("four",), temperature=0),))),
                                tasks, {"four": four}, concurrency=2, seed=0)
    row = accuracy_row(result, tasks)
    assert row["tasks"] == 2 and row["correct"] == 1 and row["accuracy"] == 0.5
    assert row["ci95"][0] < 0.5 < row["ci95"][1] and row["completion_tokens_per_correct"] == 4
    other = await answer_tasks(System("other", Pipeline("other", (Propose(models=("four",), temperature=0),))),
                               tasks, {"four": four}, concurrency=2, seed=0)
    always_a = ScriptedEngine("judge", reply=lambda m, p, i: "A")
    pairs = await judge_pairs(always_a, tasks, result, other, concurrency=4)
    row = pairs.row()
    assert row["pairs"] == 3 and len(always_a.calls) == 6
    assert row["win_rate"] == 0.5 and row["ties"] == 3 and row["order_consistency"] == 0.0
    assert row["first_position_rate"] == 1.0 and row["verdicts"] == [("A", "A")] * 3
    assert parse_verdict("B") == "B" and parse_verdict("Neither") is None
    assert parse_verdict("[[A]] would be wrong: B explains it.\n[[B]]") == "B" and parse_verdict("[[C]]") == "C"
    fair = ScriptedEngine("judge", reply=lambda m, p, i: "[[A]]" if "Answer: 4" in m[-1]["content"].split(
        "[Response B]")[0] else "[[B]]")  # always prefers "Answer: 4", wherever it is shown
    wrong = ScriptedEngine("w", reply=lambda m, p, i: "Answer: 5")
    worse = await answer_tasks(System("worse", Pipeline("w", (Propose(models=("w",), temperature=0),))),
                               tasks, {"w": wrong}, concurrency=2, seed=0)
    row = (await judge_pairs(fair, tasks, result, worse, concurrency=4)).row()
    assert row["wins"] == 3 and row["win_rate"] == 1.0 and row["order_consistency"] == 1.0
    assert row["first_position_rate"] == 0.5


async def test_a_rerun_of_some_items_seeds_each_as_the_whole_run_did(tmp_path):
    """`moa eval --ids`: item k of the suite is seeded seed + 1000 * k in a rerun of a few items too."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(f'{{"id": "{k}", "prompt": "q{k}", "answer": "1", "scorer": "numeric"}}\n'
                            for k in range(4)))
    tasks = load_tasks(path)
    system = System("e", Pipeline("e", (Propose(models=("e",), temperature=0.7),)))
    whole, some = ScriptedEngine("e"), ScriptedEngine("e")
    await answer_tasks(system, tasks, {"e": whole}, concurrency=1, seed=5)
    await answer_tasks(system, [tasks[1], tasks[3]], {"e": some}, concurrency=1, seed=5, positions=[1, 3])
    seeds = {c.messages[-1]["content"]: c.params.seed for c in whole.calls}
    assert seeds == {"q0": 5, "q1": 1005, "q2": 2005, "q3": 3005}
    assert {c.messages[-1]["content"]: c.params.seed for c in some.calls} == {"q1": 1005, "q3": 3005}


# -- reports -----------------------------------------------------------------------------------


async def test_report_json_markdown_and_plots(tmp_path):
    engine = ScriptedEngine("a", delay_s=0.01)
    bench = PipelineBench(SELF_MOA)
    calls: list[RecordedCall] = []
    for system, engines, levels in (("moa", {"a": Recording(engine, calls)}, (1, 2)),
                                    ("split-n", {"a": SplitN(engine)}, (1, 2)),
                                    ("http", {"a": SplitN(engine)}, (1, 2)),
                                    ("sequential", sequential_engines({"a": engine}), (1,))):
        for c in levels:
            async def request(i, t0, engines=engines):
                return await pipeline_request(SELF_MOA, Q, engines, i, t0, seed=i)

            bench.levels.append(await run_level(system, "self", request, concurrency=c, requests=4))
    bench.raw = await replay(calls, {"a": engine})
    data = report.to_json([bench], {"date": "today", "command": "moa bench"})
    json.dumps(data)  # serialisable
    rows = data["pipelines"][0]["comparison"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert all(r["efficiency"] and r["vs_sequential"] and r["vs_http"] and r["vs_split_n"] for r in rows)
    md = report.markdown(data)
    assert "| moa | 2 |" in md and "efficiency (a)" in md and "Raw batch (a)" in md
    paths = report.plots(data, tmp_path)
    assert [p.name for p in paths] == ["throughput.png", "latency_cdf.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
    assert report.rich_tables(data)
    # A later run of one system replaces that system's levels; the comparisons follow.
    rerun = json.loads(json.dumps(data))
    entry = rerun["pipelines"][0]
    entry["levels"] = [lv for lv in entry["levels"] if lv["system"] == "sequential"]
    entry["levels"][0]["request_throughput"] /= 2
    rerun["meta"]["command"] = "moa bench --systems sequential"
    merged = report.merge([data, rerun])
    seq = [lv for lv in merged["pipelines"][0]["levels"] if lv["system"] == "sequential"]
    assert len(seq) == 1 and len(merged["pipelines"][0]["levels"]) == len(data["pipelines"][0]["levels"])
    assert merged["pipelines"][0]["comparison"][0]["vs_sequential"] == pytest.approx(2 * rows[0]["vs_sequential"])
    assert "Merged with: `moa bench --systems sequential`" in report.markdown(merged)


def test_critical_path_is_the_slowest_call_per_layer_summed():
    from moa.trace import CallRecord, Trace

    trace = Trace("p")
    trace.calls = [CallRecord("propose", 1, "a", 1, 0.0, end_s=1.0), CallRecord("propose", 1, "b", 1, 0.1, end_s=2.0),
                   CallRecord("aggregate", 2, "a", 1, 2.5, end_s=3.5), CallRecord("propose", 1, "c", 1, 0.2)]
    assert trace.critical_path_s() == pytest.approx(2.0 + 1.0)  # unfinished calls do not count


async def test_pipeline_request_reports_latency_over_critical_path():
    engines = {"a": ScriptedEngine("a", delay_s=0.05)}
    sample = await pipeline_request(SELF_MOA, Q, engines, 0, 0.0, seed=1)
    assert sample.critical_path_s == pytest.approx(0.15 + 0.05, abs=0.05)  # 3 samples, then one aggregation
    assert 1.0 <= sample.latency_s / sample.critical_path_s < 1.5
    level = LevelResult("moa", "self", 1, sample.latency_s, [sample])
    assert summarize(level)["critical_path_ratio"] == pytest.approx(sample.latency_s / sample.critical_path_s)


def test_pareto_front_keeps_the_systems_nothing_beats_on_accuracy_and_tokens(tmp_path):
    from serving.bench.pareto import main, pareto_front

    def row(name, accuracy, tokens):
        return {"system": name, "models": [name], "accuracy": accuracy, "ci95": [accuracy - 0.1, accuracy + 0.05],
                "completion_tokens_per_task": tokens}

    rows = [row("greedy", 0.90, 75), row("adaptive", 0.92, 139), row("self-moa", 0.92, 500), row("small", 0.58, 83),
            row("vote", 0.56, 367)]
    assert [r["system"] for r in pareto_front(rows)] == ["greedy", "adaptive"]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"accuracy": rows}))
    main([str(results), "-o", str(tmp_path / "pareto.png")])
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


async def test_human_votes_are_reported_beside_the_judges_verdicts_in_both_orders(tmp_path):
    """A judge that prefers the answer saying "4": it agrees with people who chose it, not with the others."""
    import re

    from moa.testing import ScriptedEngine
    from serving.api.votes import read_votes
    from serving.bench.human_votes import judge_votes

    def prefers_four(messages, params, i):
        a, b = re.search(r"\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\n", messages[-1]["content"], re.S).groups()
        return "[[A]]" if "4" in a and "4" not in b else "[[B]]" if "4" in b and "4" not in a else "[[C]]"

    def vote(a: tuple[str, str], b: tuple[str, str], verdict: str) -> str:
        return json.dumps({"messages": [{"role": "user", "content": "2 + 2?"}], "verdict": verdict,
                           "a": {"target": a[0], "answer": a[1]}, "b": {"target": b[0], "answer": b[1]}})

    path = tmp_path / "votes.jsonl"
    path.write_text("\n".join([
        vote(("moa", "It is 4."), ("small", "It is 5."), "a"),    # judge agrees
        vote(("small", "It is 5."), ("moa", "4"), "b"),           # judge agrees (sides swapped)
        vote(("moa", "It is 4."), ("small", "Five."), "b"),       # judge disagrees
        vote(("moa", "It is 4."), ("small", "4!"), "both_bad"),   # a tie both ways: agrees
        vote(("moa", "4"), ("big", "It is 5."), "tie"),           # judge picks moa: disagrees with a tie
    ]) + "\n")
    rows = await judge_votes(ScriptedEngine("judge", reply=prefers_four), read_votes(path))
    by_pair = {tuple(r["pair"]): r for r in rows}
    moa_small = by_pair["moa", "small"]
    assert moa_small["votes"] == 4 and moa_small["both_bad"] == 1
    assert moa_small["human_win_rate"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert moa_small["judge_win_rate"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert moa_small["agreement"] == pytest.approx(3 / 4) and moa_small["agreement_decisive"] == pytest.approx(2 / 3)
    assert by_pair["big", "moa"]["agreement"] == 0 and by_pair["big", "moa"]["agreement_decisive"] is None
    overall = by_pair["all pairs", ""]
    assert overall["votes"] == 5 and overall["agreement"] == pytest.approx(3 / 5) and overall["human_win_rate"] is None


def test_a_bad_votes_line_names_the_file_and_line(tmp_path):
    from serving.api.votes import read_votes

    path = tmp_path / "votes.jsonl"
    path.write_text('{"verdict": "a"}\n')
    with pytest.raises(ValueError, match=r"votes.jsonl:1: not a playground vote"):
        read_votes(path)


async def test_a_replay_keeps_the_recorded_number_of_calls_in_flight_and_recording_measures_it():
    """(a′): the same calls with k in flight; InFlight's time-weighted mean is what the pipeline kept."""
    from serving.bench.baselines import InFlight, RecordedCall, Recording
    from serving.bench.measure import replay

    class Counting(ScriptedEngine):
        peak: int = 0

        async def generate(self, messages, params, *, request_id=None):
            self.peak = max(self.peak, self.stats.running + 1)
            return await super().generate(messages, params, request_id=request_id)

    engine = Counting("a", delay_s=0.02)
    calls = [RecordedCall("a", [{"role": "user", "content": f"q{i}"}], SamplingParams()) for i in range(9)]
    result = await replay(calls, {"a": engine}, in_flight=3)
    assert result.calls == 9 and result.in_flight == 3 and engine.peak == 3
    everything = Counting("a", delay_s=0.02)
    assert (await replay(calls, {"a": everything})).in_flight is None and everything.peak == 9
    in_flight, recorded = InFlight(), []
    recording = Recording(ScriptedEngine("a", delay_s=0.05), recorded, in_flight)
    await asyncio.gather(*(recording.generate(c.messages, c.params) for c in calls[:4]))
    assert len(recorded) == 4 and in_flight.now == 0 and 3.0 < in_flight.mean <= 4.0


async def test_http_request_scores_the_fallback_a_broken_off_pipeline_answer_is_replaced_with():
    """`moa bench/eval --url` record what the non-streaming request returns, not an error or the void words."""
    import openai

    from serving.api.app import ServerSettings, create_app
    from serving.bench.http_client import http_request
    from serving.models.registry import load_registry
    from tests.conftest import QWEN_SMALL, SMALL, uvicorn_serving

    engines = {SMALL: ScriptedEngine(SMALL), QWEN_SMALL: ScriptedEngine(QWEN_SMALL, fail="connection lost",
                                                                        fail_after=2)}
    pipeline = Pipeline("p", (Propose(models=(SMALL,)), Aggregate(model=QWEN_SMALL)))
    app = create_app(load_registry(), models=[], pipelines={"p": pipeline}, settings=ServerSettings(),
                     engines=engines)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    async with uvicorn_serving(app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        sample = await http_request(client, "p", messages, 0, 0.0, max_tokens=None, seed=1, pipeline=True)
        await client.close()
    assert (sample.error, sample.answer) == (None, f"{SMALL} answer 0 seed 1")
    assert sample.engine_calls == 2
