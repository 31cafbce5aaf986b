"""`moa eval --suite`: suites, HumanEval's hidden tests and scoring, pass@k, and `--url`, on scripted engines.

Programs run in serving/sandbox.py where it loads; elsewhere in a stand-in that runs them with this Python,
unisolated (trusted code only: canonical solutions and scripted answers).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import re
import threading
import time

import pytest

from moa.pipeline import Pipeline
from moa.steps import Aggregate, Propose
from moa.testing import ScriptedEngine
from serving.bench.eval_suites import get_suite, subset
from serving.bench.eval_suites.humaneval import (
    INSTRUCTION,
    PUBLISHED_SOURCE,
    HumanEval,
    Problem,
    extract_code,
    source,
)
from serving.bench.eval_suites.tasks import TaskSuite
from serving.bench.evaluate import System, accuracy_row, answer_tasks, single_model
from serving.bench.stats import pass_at_k
from tests.conftest import QWEN_SMALL, SMALL, uvicorn_serving

PROBLEMS = HumanEval().load()
BY_ID = {p.id: p for p in PROBLEMS}


class StandIn:
    """The real sandbox, recording every program it is given (what the scorer sends, checked below)."""

    def __init__(self) -> None:
        from serving.sandbox import Sandbox

        self.sources: list[str] = []
        self.sandbox = Sandbox()

    async def run_python(self, source: str, *, limits: object = None):
        self.sources.append(source)
        return await self.sandbox.run_python(source)


def solved(problem: Problem) -> str:
    """A chat-style answer: the whole function in a fenced block, between sentences."""
    return f"Here it is:\n\n```python\n{problem.prompt}{problem.canonical_solution}```\n\nIt runs in O(n)."


def wrong(problem: Problem) -> str:
    return f"```python\ndef {problem.entry_point}(*args, **kwargs):\n    return 12345\n```"


def problem_in(messages: list[dict]) -> Problem:
    """Which problem a scripted engine was asked (by its prompt, the only thing it sees)."""
    return next(p for p in PROBLEMS if p.prompt in messages[-1]["content"])


# -- pass@k ------------------------------------------------------------------------------------


def test_pass_at_k_is_the_chance_that_k_of_the_n_samples_include_a_pass():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3) and pass_at_k(10, 0, 10) == 0 and pass_at_k(10, 6, 5) == 1
    # Large n: exact binomials, no overflow; agrees with the product form 1 - prod(1 - k / i).
    product = 1 - float(__import__("numpy").prod([1 - 100 / i for i in range(1000 - 3 + 1, 1001)]))
    assert pass_at_k(1000, 3, 100) == pytest.approx(product, rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


# -- HumanEval: what the system sees -----------------------------------------------------------


def test_humaneval_has_164_problems_each_asked_as_one_user_message():
    assert len(PROBLEMS) == 164 and len(BY_ID) == 164 and PROBLEMS[0].id == "HumanEval/0"
    for p in PROBLEMS:
        assert p.conversation() == [{"role": "user", "content": INSTRUCTION.format(prompt=p.prompt)}]
    assert PROBLEMS[0].conversation()[0]["content"].startswith(
        "Complete the following Python function. Reply with one Python code block containing the complete function "
        "(with its imports).\n\n```python\nfrom typing import List\n")
    assert PROBLEMS[0].conversation()[0]["content"].endswith('"""\n```')


def test_no_conversation_contains_any_of_its_tests():
    for p in PROBLEMS:
        shown = "\n".join(m["content"] for m in p.conversation())
        hidden = {line.strip() for line in p.test.splitlines() if line.strip() and line.strip() not in p.prompt}
        assert hidden, p.id  # every problem has test lines of its own
        leaked = [line for line in hidden if line in shown]
        assert not leaked, (p.id, leaked)
        assert "def check(candidate)" not in shown and "METADATA" not in shown and "candidate(" not in shown
        assert p.canonical_solution.strip() not in shown


# -- HumanEval: scoring ------------------------------------------------------------------------


def test_code_is_the_first_python_block_else_the_first_block_else_the_whole_response():
    assert extract_code("Sure.\n```python\na = 1\n```\nand\n```python\nb = 2\n```") == "a = 1\n"
    assert extract_code("```text\nusage\n```\n```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    assert extract_code("    return 3\n") == "    return 3\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off by max_tokens


def test_a_body_is_completed_after_the_prompt_and_a_function_keeps_the_prompts_imports_and_helpers():
    p = BY_ID["HumanEval/32"]  # find_zero: the tests call the prompt's helper `poly`
    body = source(p, p.canonical_solution)
    assert p.prompt + p.canonical_solution in body and body.endswith(f"{p.test}\n\ncheck(find_zero)\n")
    alone = source(p, f"```python\nimport math\n\ndef find_zero(xs: list):{p.canonical_solution.split(':', 1)[1]}```")
    assert alone.index("def poly(") < alone.index("def find_zero(") and alone.count("def find_zero(") == 1
    first = BY_ID["HumanEval/0"]
    text = source(first, "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```")
    assert text.startswith("from typing import List\n\n") and "check(has_close_elements)" in text


async def test_scoring_runs_the_answer_against_the_tests_with_a_stand_in():
    runner = StandIn()
    suite = HumanEval(runner)
    ids = ["HumanEval/0", "HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/163"]
    problems = [BY_ID[i] for i in ids]
    for answer in (lambda p: p.canonical_solution, solved):
        assert all(await asyncio.gather(*(suite.score(p, answer(p)) for p in problems)))
    for answer in (wrong, lambda p: "", lambda p: "I cannot help with that."):
        assert not any(await asyncio.gather(*(suite.score(p, answer(p)) for p in problems)))
    assert all("check(" in source for source in runner.sources)


async def test_every_canonical_solution_passes_in_the_real_sandbox_and_wrong_answers_fail():
    sandbox = pytest.importorskip("serving.sandbox", reason="serving/sandbox.py is not there yet (another change)")
    suite = HumanEval()
    assert suite.prepare()["sandbox"] == sandbox.available()
    started = time.perf_counter()
    passed = await asyncio.gather(*(suite.score(p, p.canonical_solution) for p in PROBLEMS))
    seconds = time.perf_counter() - started
    print(f"164 canonical solutions scored in the sandbox in {seconds:.1f} s")
    assert [p.id for p, ok in zip(PROBLEMS, passed, strict=True) if not ok] == []
    assert seconds < 60
    sample = PROBLEMS[::20]
    assert all(await asyncio.gather(*(suite.score(p, solved(p)) for p in sample)))
    quick = HumanEval(sandbox.Sandbox(sandbox.Limits(wall_s=2.0, cpu_s=2.0)))  # the endless loop ends sooner
    for answer in (wrong, lambda p: "", lambda p: f"```python\ndef {p.entry_point}(*a):\n    while True: pass\n```"):
        assert not any(await asyncio.gather(*(quick.score(p, answer(p)) for p in sample[:3])))


def test_published_figures_match_registry_and_served_names():
    suite = HumanEval()
    assert suite.published("qwen2.5-coder-1.5b").pass_at_1 == pytest.approx(0.707)
    assert suite.published("qwen2.5-coder-0.5b").pass_at_1 == pytest.approx(0.616)
    assert suite.published("Qwen/Qwen2.5-Coder-7B-Instruct").pass_at_1 == pytest.approx(0.884)
    assert suite.published("qwen2.5-coder-1.5b").source == PUBLISHED_SOURCE and "arXiv" in PUBLISHED_SOURCE
    assert suite.published("smollm2-135m") is None and TaskSuite().published("qwen2.5-coder-1.5b") is None


# -- suites in the harness ---------------------------------------------------------------------


def test_suites_by_name_and_subsets():
    assert isinstance(get_suite("tasks"), TaskSuite) and isinstance(get_suite("humaneval"), HumanEval)
    with pytest.raises(ValueError, match="unknown suite 'mmlu'"):
        get_suite("mmlu")
    with pytest.raises(ValueError, match="--tasks"):
        get_suite("humaneval", tasks_file=__import__("pathlib").Path("t.jsonl"))
    items = list(range(10))
    assert subset(items) == (items, None)
    assert subset(items, limit=3) == ([0, 1, 2], "the first 3 of 10")
    picked, said = subset(items, sample=4, seed=7)
    assert picked == sorted(picked) and len(set(picked)) == 4 and said == "4 of 10 drawn at random with seed 7"
    assert subset(items, sample=4, seed=7)[0] == picked and subset(items, sample=4, seed=8)[0] != picked
    assert subset(items, limit=20) == (items, None)
    with pytest.raises(ValueError, match="not both"):
        subset(items, limit=2, sample=2)


async def test_the_tasks_suite_scores_as_before():
    suite = TaskSuite()
    tasks = suite.load()
    assert len(tasks) == 50 and all(t.scored for t in tasks)
    engine = ScriptedEngine("m", reply=lambda m, p, i: "Answer: 4")
    result = await answer_tasks(System("m", Pipeline("m", (Propose(models=("m",), temperature=0),))), tasks[:5],
                                {"m": engine}, concurrency=2, seed=0, suite=suite)
    row = accuracy_row(result, tasks[:5])
    assert row["samples"] == 1 and row["pass_at"] == {"1": row["accuracy"]} and isinstance(row["correct"], int)
    assert row["published"] is None and row["seconds_per_task"] == pytest.approx(result.wall_s / 5)


async def test_humaneval_greedy_in_process_scores_pass_at_1_beside_the_published_figure():
    problems = PROBLEMS[:6]
    right = {p.id for p in problems[:4]}

    def reply(messages, params, i):
        p = problem_in(messages)
        return solved(p) if p.id in right else wrong(p)

    name = "qwen2.5-coder-1.5b"
    engine = ScriptedEngine(name, reply=reply)
    system = single_model(name, max_tokens=1024)
    suite = HumanEval(StandIn())
    result = await answer_tasks(system, problems, {name: engine}, concurrency=3, seed=0, suite=suite)
    row = accuracy_row(result, problems, suite.published(name) if system.single_model else None)
    assert [c.params.temperature for c in engine.calls] == [0.0] * 6 and all(c.params.n == 1 for c in engine.calls)
    assert all(c.params.max_tokens == 1024 for c in engine.calls)
    assert row["correct"] == 4 and row["accuracy"] == pytest.approx(4 / 6) and row["pass_at"] == {"1": 4 / 6}
    assert row["ci95"][0] < 4 / 6 < row["ci95"][1] and row["published"]["pass@1"] == pytest.approx(0.707)
    assert result.passed == {p.id: [p.id in right] for p in problems}


async def test_samples_are_one_n_request_per_problem_and_give_pass_at_k():
    problems = PROBLEMS[:3]
    passes = {problems[0].id: 10, problems[1].id: 3, problems[2].id: 0}  # of 10 samples

    def reply(messages, params, i):
        p = problem_in(messages)
        return solved(p) if i < passes[p.id] else wrong(p)

    engine = ScriptedEngine("m", reply=reply)
    system = single_model("m", max_tokens=512, samples=10)
    result = await answer_tasks(system, problems, {"m": engine}, concurrency=3, seed=5, suite=HumanEval(StandIn()))
    row = accuracy_row(result, problems)
    assert len(engine.calls) == 3 and {(c.params.n, c.params.temperature) for c in engine.calls} == {(10, 0.8)}
    assert sorted(c.params.seed for c in engine.calls) == [5, 1005, 2005]
    assert row["samples"] == 10 and row["samples_passed"] == 13
    assert row["accuracy"] == pytest.approx((1 + 0.3 + 0) / 3) and row["correct"] == pytest.approx(1.3)
    assert set(row["pass_at"]) == {"1", "5", "10"}
    assert row["pass_at"]["5"] == pytest.approx((1 + pass_at_k(10, 3, 5) + 0) / 3)
    assert row["pass_at"]["10"] == pytest.approx(2 / 3)
    assert len(result.samples[0].answers) == 10 and result.samples[0].answer == result.samples[0].answers[0]
    with pytest.raises(ValueError, match="temperature above 0"):
        single_model("m", max_tokens=None, samples=4, temperature=0.0)


async def test_a_failed_request_counts_as_failed_samples():
    engine = ScriptedEngine("m", fail="boom")
    problems = PROBLEMS[:2]
    result = await answer_tasks(single_model("m", max_tokens=64, samples=3), problems, {"m": engine},
                                concurrency=2, seed=0, suite=HumanEval(StandIn()))
    row = accuracy_row(result, problems)
    assert row["errors"] == 2 and row["accuracy"] == 0 and result.passed[problems[0].id] == [False] * 3


# -- reports -----------------------------------------------------------------------------------


def _row(system: str, models: list[str], samples: int, published: float | None) -> dict:
    ks = [k for k in (1, 5, 10) if k <= samples]
    return {"system": system, "models": models, "tasks": 164, "correct": 116 if samples == 1 else 110.3,
            "accuracy": 0.7073, "ci95": [0.633, 0.771], "samples": samples, "samples_passed": 116 * samples,
            "pass_at": {str(k): 0.7 + k / 100 for k in ks}, "by_category": {"humaneval": 0.7073},
            "published": {"pass@1": published, "source": PUBLISHED_SOURCE} if published else None,
            "completion_tokens_per_task": 212.4 * samples, "seconds_per_task": 0.45, "seconds_per_correct": 0.63,
            "engine_calls_per_task": 1.0, "completion_tokens_per_correct": 300.0}


@pytest.mark.parametrize("samples", [1, 10])
def test_the_pass_at_k_table_fits_80_columns_and_the_summary_has_every_column(monkeypatch, samples):
    from rich.console import Console

    from serving.cli import common
    from serving.cli.eval import markdown, tables

    data = {"accuracy": [_row("qwen2.5-coder-1.5b", ["qwen2.5-coder-1.5b"], samples, 0.707),
                         _row("qwen2.5-coder-0.5b", ["qwen2.5-coder-0.5b"], samples, 0.616),
                         _row("self-moa@after", ["qwen2.5-coder-1.5b"], 1, None)],
            "pairwise": [], "votes": [], "routing": [],
            "meta": {"suite": "humaneval", "metric": "pass@k", "samples": samples, "temperature": 0.8,
                     "subset": None, "sandbox": "bubblewrap", "tasks": "humaneval"}}
    console = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(common, "out", console)
    for table in tables(data):
        common.show(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text, text
    line = next(line for line in text.splitlines() if line.startswith("qwen2.5-coder-1.5b"))
    assert "70.7 [63.3–77.1]" in line and "70.7" in line.split("]")[1] and "0.45" in line
    assert ("116/164" in line) == (samples == 1) and ("80.0" in line) == (samples == 10)  # pass@10
    assert "self-moa@after: qwen2.5-coder-1.5b" in text and PUBLISHED_SOURCE in " ".join(text.split())
    md = markdown(data)
    assert "| system | models | samples | passed | pass@1 [95% CI] |" in md and "Suite: humaneval" in md
    assert "| 70.7% [63.3–77.1%] |" in md
    assert ("| pass@5 | pass@10 |" in md) == (samples == 10) and "sandbox: bubblewrap" in md


# -- --url -------------------------------------------------------------------------------------


def humaneval_server():
    """moa serve on scripted engines that answer HumanEval: SMALL solves every problem, QWEN_SMALL none."""
    from serving.api.app import ServerSettings, create_app
    from serving.models.registry import load_registry

    engines = {SMALL: ScriptedEngine(SMALL, reply=lambda m, p, i: solved(problem_in(m))),
               QWEN_SMALL: ScriptedEngine(QWEN_SMALL, reply=lambda m, p, i: wrong(problem_in(m)))}
    pipeline = Pipeline("pick", (Propose(models=(QWEN_SMALL,)), Aggregate(model=SMALL)))
    return create_app(load_registry(), models=[SMALL, QWEN_SMALL], pipelines={"pick": pipeline},
                      settings=ServerSettings(), engines=engines), engines


async def test_url_systems_are_served_models_and_pipelines_scored_here():
    from serving.bench.evaluate_url import answer_served, client_for, served_systems

    app, engines = humaneval_server()
    problems = PROBLEMS[:4]
    suite = HumanEval(StandIn())
    async with uvicorn_serving(app) as url:
        client = client_for(url, "none")
        with pytest.raises(ValueError, match="does not serve nope; it serves"):
            await served_systems(client, url, ["nope"], max_tokens=256)
        systems = await served_systems(client, url, [SMALL, "pick"], max_tokens=256, samples=3)
        assert [(s.served, s.samples, s.models()) for s in systems] == [("model", 3, (SMALL,)),
                                                                        ("pipeline", 1, (QWEN_SMALL, SMALL))]
        results = [await answer_served(client, s, problems, suite, concurrency=2, seed=0, max_tokens=256)
                   for s in systems]
        greedy = (await served_systems(client, url, [QWEN_SMALL], max_tokens=128))[0]
        wrong_row = accuracy_row(await answer_served(client, greedy, problems, suite, concurrency=4, seed=0,
                                                     max_tokens=128), problems)
        await client.close()
    model, pipe = (accuracy_row(r, problems) for r in results)
    assert model["pass_at"] == {"1": 1.0} and model["samples_passed"] == 12 and model["errors"] == 0
    assert model["completion_tokens_per_task"] > 0 and len(results[0].samples[0].answers) == 3
    assert pipe["accuracy"] == 1.0 and pipe["samples"] == 1 and pipe["models"] == [QWEN_SMALL, SMALL]
    assert wrong_row["accuracy"] == 0 and wrong_row["errors"] == 0
    sampled = [c.params for c in engines[SMALL].calls if c.params.n == 3]
    assert len(sampled) == 4 and {p.temperature for p in sampled} == {0.8}
    assert {c.params.temperature for c in engines[QWEN_SMALL].calls if c.params.n == 1} >= {0.0}  # greedy
    assert all(c.params.max_tokens == 128 for c in engines[QWEN_SMALL].calls[-4:])


def test_moa_eval_url_writes_results_and_summary(tmp_path, monkeypatch):
    """The command end to end against a server in a thread: tables, results.json, summary.md."""
    import uvicorn
    from typer.testing import CliRunner

    from serving.cli import app
    from serving.engines.vllm_server import free_port

    server_app, _ = humaneval_server()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(server_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    monkeypatch.setattr(HumanEval, "prepare", lambda self: {"sandbox": "stand-in"})
    monkeypatch.setattr(HumanEval, "runner", lambda self: STAND_IN)
    try:
        out = CliRunner().invoke(app, ["eval", "--url", f"http://127.0.0.1:{port}", "-s", SMALL, "-s", "pick",
                                       "--suite", "humaneval", "--sample", "5", "--seed", "3", "-o", str(tmp_path)])
    finally:
        server.should_exit = True
        thread.join(10)
    assert out.exit_code == 0, out.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["suite"] == "humaneval" and data["meta"]["url"].endswith(str(port))
    assert data["meta"]["subset"] == "5 of 164 drawn at random with seed 3" and data["meta"]["items"] == 5
    assert [r["system"] for r in data["accuracy"]] == [SMALL, "pick"] and data["accuracy"][0]["accuracy"] == 1.0
    assert len(data["responses"][SMALL]) == 5 and data["responses"][SMALL][0]["passed"] == [True]
    md = (tmp_path / "summary.md").read_text()
    assert "5 of 164 drawn at random with seed 3" in md and re.search(rf"\| {re.escape(SMALL)} \|", md)
    refused = CliRunner().invoke(app, ["eval", "--url", "http://127.0.0.1:1", "-s", SMALL, "--pairwise", SMALL])
    assert refused.exit_code == 1


def test_moa_eval_in_process_with_samples_on_scripted_engines(tmp_path, monkeypatch):
    """The command's in-process path, its engine pool replaced by scripted engines that pass 2 samples of 5."""
    from typer.testing import CliRunner

    from serving.cli import app

    class Pool:
        def __init__(self, registry, models):
            self.engines = {m: ScriptedEngine(m, reply=lambda msgs, p, i: solved(problem_in(msgs)) if i < 2
                                              else wrong(problem_in(msgs))) for m in models}

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return None

    monkeypatch.setattr("serving.engines.pool.EnginePool", Pool)
    monkeypatch.setattr("serving.cli.eval.ensure_local", lambda spec: None)
    monkeypatch.setattr(HumanEval, "prepare", lambda self: {"sandbox": "stand-in"})
    monkeypatch.setattr(HumanEval, "runner", lambda self: STAND_IN)
    name = "qwen2.5-coder-1.5b"
    out = CliRunner().invoke(app, ["-v", "eval", "--suite", "humaneval", "-s", name, "--samples", "5", "--limit", "3",
                                   "-o", str(tmp_path)])
    assert out.exit_code == 0, out.output
    data = json.loads((tmp_path / "results.json").read_text())
    row = data["accuracy"][0]
    assert data["meta"]["samples"] == 5 and data["meta"]["temperature"] == 0.8 and data["meta"]["max_tokens"] == 1024
    assert row["pass_at"] == {"1": pytest.approx(0.4), "5": 1.0}
    assert row["published"]["pass@1"] == pytest.approx(0.707) and data["meta"]["subset"] == "the first 3 of 164"
    assert data["responses"][name][0]["passed"] == [True, True, False, False, False]
    assert "40.0 [" in out.output and "100.0" in out.output and "70.7" in out.output  # pass@1, pass@5, published
    from rich.console import Console

    from serving.cli import common

    errors = Console(file=io.StringIO(), width=200)
    monkeypatch.setattr(common, "err", errors)  # user_errors() prints there
    greedy = CliRunner().invoke(app, ["eval", "--suite", "humaneval", "-s", name, "--samples", "5",
                                      "--temperature", "0"])
    assert greedy.exit_code == 1 and "--samples 5 needs --temperature above 0" in errors.file.getvalue()


STAND_IN = StandIn()


async def test_the_scorer_runs_answers_as_the_official_harness_does():
    """An answer's own `if __name__ == "__main__":` block does not run (a wrong answer that exits 0 there through
    unittest.main() does not pass; a right one with a failing self-test of its own does), and exit() fails."""
    from serving.sandbox import Sandbox

    suite = HumanEval(runner=Sandbox())
    p = BY_ID["HumanEval/0"]
    right = f"```python\n{p.prompt}{p.canonical_solution}\n```"
    wrong_exits_early = ("```python\nimport unittest\ndef has_close_elements(numbers, threshold):\n    return False\n"
                         "if __name__ == '__main__':\n    unittest.main(argv=['x'], exit=True)\n```")
    right_with_bad_selftest = right.replace("\n```", "\nif __name__ == '__main__':\n    assert False\n```")
    exits = f"```python\n{p.prompt}{p.canonical_solution}\nraise SystemExit(0)\n```"
    assert await suite.score(p, right) and await suite.score(p, right_with_bad_selftest)
    assert not await suite.score(p, wrong_exits_early) and not await suite.score(p, exits)
