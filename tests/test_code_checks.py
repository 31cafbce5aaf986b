"""The `check` step: checks taken from the conversation only, run in the real sandbox, and what later steps
do with them (order, filter, escalation, references); the server's opt-in. Scripted engines, real sandbox."""

from __future__ import annotations

import httpx
import pytest

from moa.code_checks import checks_from, extract_code, user_code
from moa.engine import InvalidRequest
from moa.pipeline import Pipeline
from moa.presets import parse_pipeline
from moa.runner import run
from moa.testing import ScriptedEngine
from serving.api.app import ServerSettings, create_app
from serving.models.registry import load_registry
from serving.sandbox import check_sandbox
from tests.conftest import uvicorn_serving

M = "coder"
STUB = '''from typing import List


def add(xs: List[int]) -> int:
    """Sum of the list.
    >>> add([1, 2])
    3
    >>> add([])
    0
    """
'''
QUESTION = [{"role": "user", "content": f"Complete this function.\n```python\n{STUB}```"}]
RIGHT = "```python\ndef add(xs: List[int]) -> int:\n    return sum(xs)\n```"
HALF = "```python\ndef add(xs):\n    return sum(xs) if xs else 1\n```"  # passes 1 of 2
WRONG = "```python\ndef add(xs):\n    return 7\n```"
LOOPS = "```python\ndef add(xs):\n    while True:\n        pass\n```"


def engine_answering(*texts: str) -> ScriptedEngine:
    """Sample i of every request answers texts[i] (greedy requests get texts[0])."""
    return ScriptedEngine(M, reply=lambda messages, params, i: texts[i % len(texts)])


def pipeline(name: str, steps: list) -> Pipeline:
    return parse_pipeline(name, {"steps": steps}, models={M})


def test_checks_come_from_the_conversation_examples_usage_lines_and_asserts():
    checks = checks_from(QUESTION)
    assert [(c.kind, c.source.strip(), c.want.strip()) for c in checks] == [
        ("example", "add([1, 2])", "3"), ("example", "add([])", "0")]
    usage = [{"role": "user", "content": "```python\ndef f(x):\n    '''f(2) ➞ 4\n    f(3) should return 9.\n"
                                         "    g(1) == 2\n    f(y) == 3\n    '''\n```\nassert f(0) == 0"}]
    assert [(c.kind, c.source, c.want) for c in checks_from(usage)] == [
        ("equals", "f(2)", "4"), ("equals", "f(3)", "9"), ("assert", "assert f(0) == 0", "")]
    # A docstring that closes right after an example's output, with the body below; `>>> f(x) == y` without an
    # output line; asserts inside a body or in prose are not checks.
    body = [{"role": "user", "content": '```python\ndef sq(n):\n    """\n    >>> sq(2)\n    4\n    """\n'
                                        '    assert n >= 0\n    return n * n\n```\nAlso: assert sq(3) => 9'}]
    assert [(c.kind, c.want) for c in checks_from(body)] == [("example", "4\n")]
    shorthand = [{"role": "user", "content": 'def f(x):\n    """\n    >>> f(2) == 4\n    """'}]
    assert [(c.kind, c.source) for c in checks_from(shorthand)] == [("assert", "assert f(2) == 4")]
    assert user_code(QUESTION) == STUB
    assert checks_from([{"role": "user", "content": "What is 2 + 2?"}]) == []
    assert extract_code("Here:\n```python\nx = 1\n```\n```python\ny = 2\n```") == "x = 1\n"


async def test_each_response_is_run_against_the_examples_and_the_most_passing_comes_first():
    engine = engine_answering(WRONG, HALF, LOOPS, RIGHT, "no code at all")
    pipe = pipeline("p", [{"propose": {"models": [M], "samples": 5, "temperature": 0.8}}, {"check": {}}])
    result = await run(pipe, QUESTION, {M: engine}, code_runner=check_sandbox())
    checked = result.responses[-1]
    assert [r.text for r in checked] == [RIGHT, HALF, WRONG, LOOPS, "no code at all"]
    assert [(r.checks.passed, r.checks.total) for r in checked] == [(2, 2), (1, 2), (0, 2), (0, 2), (0, 2)]
    assert "TimeoutError" in checked[3].checks.outputs[0]  # the endless loop failed its checks, nothing else
    assert "checks: 2 from the conversation" in result.trace.steps[1].notes[0]


async def test_the_users_code_runs_first_and_a_body_only_answer_continues_it():
    """Helpers and imports in the question exist for the response; an answer that only continues the body is
    the question's code plus its lines (as the HumanEval scorer reads it); `from __future__` may lead."""
    question = [{"role": "user", "content": '```python\ndef double(x):\n    return 2 * x\n\n\ndef quad(x):\n'
                                            '    """\n    >>> quad(3)\n    12\n    """\n```'}]
    answers = ["```python\nfrom __future__ import annotations\ndef quad(x):\n    return double(double(x))\n```",
               "    return double(x) * 2\n"]
    engine = engine_answering(*answers)
    pipe = pipeline("p", [{"propose": {"models": [M], "samples": 2, "temperature": 0.8}}, {"check": {}}])
    result = await run(pipe, question, {M: engine}, code_runner=check_sandbox())
    assert [(r.checks.passed, r.checks.total) for r in result.responses[-1]] == [(1, 1), (1, 1)]


async def test_a_failed_escalation_keeps_the_answer_it_escalated_from():
    from moa.runner import Ceiling

    pipe = load_registry().pipeline("adaptive-code").with_models({"qwen2.5-coder-1.5b": M})
    engine = engine_answering(WRONG)
    result = await run(pipe, QUESTION, {M: engine}, code_runner=check_sandbox(), ceiling=Ceiling(tokens=200))
    assert result.answer == WRONG and any("no more samples" in n for s in result.trace.steps for n in s.notes)


async def test_adaptive_code_samples_only_where_greedy_fails_an_example():
    pipe = load_registry().pipeline("adaptive-code").with_models({"qwen2.5-coder-1.5b": M})
    good = engine_answering(RIGHT)
    result = await run(pipe, QUESTION, {M: good}, code_runner=check_sandbox())
    assert result.answer == RIGHT and len(good.calls) == 1  # greedy passed: no samples drawn
    bad = engine_answering(WRONG, HALF, RIGHT, WRONG)  # greedy answers texts[0]
    result = await run(pipe, QUESTION, {M: bad}, code_runner=check_sandbox())
    assert [c.params.n for c in bad.calls] == [1, 8] and result.answer == RIGHT
    # No examples in the question: nothing to choose by, so no samples either.
    plain = engine_answering(WRONG)
    await run(pipe, [{"role": "user", "content": "Write add(xs) returning the sum."}], {M: plain},
              code_runner=check_sandbox())
    assert len(plain.calls) == 1


async def test_a_synthesis_sees_each_references_check_result_and_filter_keeps_the_passing():
    engine = engine_answering(WRONG, RIGHT, HALF)
    pipe = pipeline("p", [{"propose": {"models": [M], "samples": 3, "temperature": 0.8}}, {"check": {}},
                          {"filter": {"passed_checks": "any"}}, {"aggregate": {"model": M}}])
    await run(pipe, QUESTION, {M: engine}, code_runner=check_sandbox())
    prompt = "\n".join(m["content"] for m in engine.calls[-1].messages)
    assert "passes 2 of 2" in prompt and "passes 1 of 2" in prompt and "return 7" not in prompt


async def test_a_pipeline_that_runs_code_is_refused_without_a_sandbox():
    pipe = pipeline("p", [{"propose": {"models": [M]}}, {"check": {}}])
    with pytest.raises(InvalidRequest, match="--allow-code-execution"):
        await run(pipe, QUESTION, {M: engine_answering(RIGHT)})


@pytest.mark.parametrize("allowed", [False, True])
async def test_the_server_answers_400_naming_the_flag_unless_code_execution_is_on(allowed):
    pipe = pipeline("checked", [{"propose": {"models": [M]}}, {"check": {}}])
    app = create_app(load_registry(), models=[], pipelines={"checked": pipe},
                     settings=ServerSettings(code_execution=allowed), engines={M: engine_answering(RIGHT)})
    async with uvicorn_serving(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        reply = await http.post("/v1/chat/completions", json={"model": "checked", "messages": QUESTION})
    if allowed:
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == RIGHT
    else:
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert "--allow-code-execution" in error["message"] and error["code"] == "code_execution_disabled"


async def test_a_suites_own_tests_never_reach_a_prompt_or_the_check_step():
    """The score is honest only if the pipeline could have run on a user's question: every prompt and every
    program the check step runs come from the conversation, never from the problem's hidden tests."""
    from serving.bench.eval_suites.humaneval import HumanEval
    from serving.bench.evaluate import System, answer_tasks

    programs: list[str] = []
    sandbox = check_sandbox()

    class Recording:
        async def run_python(self, source: str):
            programs.append(source)
            return await sandbox.run_python(source)

    problems = HumanEval().load()[:12]
    engine = engine_answering(WRONG, RIGHT)
    pipe = load_registry().pipeline("code-best-of").with_models({"qwen2.5-coder-1.5b": M})
    result = await answer_tasks(System("code-best-of", pipe), problems, {M: engine}, concurrency=4, seed=0,
                                code_runner=Recording(), suite=HumanEval(runner=sandbox))
    assert programs and all(s.ok for s in result.samples)
    prompts = ["\n".join(m["content"] for m in call.messages) for call in engine.calls]
    for problem in problems:
        hidden = [line.strip() for line in problem.test.splitlines()
                  if line.strip() and line.strip() not in problem.prompt]
        assert hidden, problem.id
        for text in prompts + programs:
            assert not any(line in text for line in hidden if len(line) > 12), problem.id
