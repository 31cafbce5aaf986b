"""Steps as a registry: adding one is a class and a handler; the runner streams and cancels as a generator."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from moa.context import HANDLERS, Response, StepContext, handles
from moa.pipeline import Pipeline
from moa.presets import PresetError, parse_pipeline
from moa.runner import iter_run, run
from moa.steps import STEP_TYPES, Aggregate, LLMStep, Propose, llm_step_kinds, step_kind
from moa.testing import ScriptedEngine
from moa.trace import AnswerDelta, CallFinished, StepStarted
from moa.transform_steps import Dropout, Map
from serving.api.targets import describe

Q = [{"role": "user", "content": "What is 2 + 2?"}]


# -- the whole of a new step: one class, one handler ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shorten(LLMStep):
    """One model rewrites each response in at most `words` words."""

    model: str = ""
    words: int = 10


async def shorten(ctx: StepContext, step: Shorten, current: list[Response]) -> list[Response]:
    out = []
    for i, response in enumerate(current):
        messages = [*ctx.conversation, {"role": "user", "content": f"Shorten to {step.words} words: {response.text}"}]
        texts = await ctx.call(step, step.model, messages, ctx.params(step), stream_answer=i == 0)  # the answer
        out.append(Response(texts[0], step.model, step.kind, ctx.layer))
    return out


@pytest.fixture
def shorten_registered():
    step_kind("shorten")(Shorten)
    handles(Shorten)(shorten)
    yield
    del STEP_TYPES["shorten"], HANDLERS[Shorten]


async def test_a_step_added_by_one_class_and_one_handler(shorten_registered):
    pipeline = parse_pipeline("short", {"steps": [{"propose": {"models": ["a"], "samples": 2}},
                                                  {"shorten": {"model": "b", "words": 5}}]}, {"a", "b"})
    engines = {"a": ScriptedEngine("a"), "b": ScriptedEngine("b")}
    events = []
    result = await run(pipeline, Q, engines, on_event=events.append, seed=1)
    assert [c.step for c in result.trace.calls] == ["propose", "shorten", "shorten"]
    assert [s.step for s in result.trace.steps] == ["propose", "shorten"]
    assert "Shorten to 5 words: a answer 0" in engines["b"].calls[0].messages[-1]["content"]
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == result.answer
    assert [e.step for e in events if isinstance(e, StepStarted)] == ["propose", "shorten"]
    assert describe(pipeline)["steps"][1] == {"step": "shorten", "models": ["b"], "words": 5}
    assert "shorten" in llm_step_kinds()
    with pytest.raises(PresetError, match=r"step 2 \(shorten\): max_tokens must be >= 1"):
        parse_pipeline("bad", {"steps": [{"propose": {"models": ["a"]}}, {"shorten": {"model": "b", "max_tokens": 0}}]})


def test_kind_names_are_the_yaml_names_everywhere():
    assert {"aggregate-seq", "majority-vote"} <= set(STEP_TYPES)
    assert all(cls.kind == kind for kind, cls in STEP_TYPES.items())
    assert all(cls in HANDLERS or any(base in HANDLERS for base in cls.__mro__) for cls in STEP_TYPES.values())


# -- the runner as a generator ----------------------------------------------------------------------


async def test_answer_chunks_add_up_to_the_answer_whatever_comes_last():
    es = {"a": ScriptedEngine("a", reply=lambda m, p, i: f"Working... The answer is: {4 + i}"),
          "agg": ScriptedEngine("agg", reply=lambda m, p, i: "So the answer is: 4")}
    for steps in [(Propose(models=("a",), samples=2), Aggregate(model="agg")),
                  (Propose(models=("a",), samples=2), Aggregate(model="agg"), Map(op="final_answer")),
                  (Propose(models=("a",), samples=2),)]:
        items = [item async for item in iter_run(Pipeline("p", steps), Q, es)]
        result = items[-1]
        chunks = [i.text for i in items if isinstance(i, AnswerDelta)]
        assert "".join(chunks) == result.answer, steps
    assert result.answer == "Working... The answer is: 4"


async def test_leaving_the_run_between_chunks_aborts_the_calls_still_running():
    es = {"fast": ScriptedEngine("fast"), "slow": ScriptedEngine("slow", delay_s=5.0)}
    items = iter_run(Pipeline("p", (Propose(models=("fast", "slow")), Aggregate(model="fast"))), Q, es)
    while not isinstance(await anext(items), CallFinished):  # the fast proposal is in, the slow one runs
        pass
    assert es["slow"].stats.running == 1
    await items.aclose()  # a client that stops reading
    assert [c.aborted for c in es["slow"].calls] == [True] and es["slow"].stats.running == 0


async def test_cancelling_a_run_aborts_its_calls():
    es = {"a": ScriptedEngine("a", delay_s=5.0)}
    task = asyncio.create_task(run(Pipeline("p", (Propose(models=("a", "a")), Aggregate(model="a"))), Q, es))
    await asyncio.sleep(0.05)
    assert es["a"].stats.running == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [c.aborted for c in es["a"].calls] == [True] and es["a"].stats.running == 0


async def test_unseeded_transforms_draw_fresh_randomness():
    es = {"a": ScriptedEngine("a")}
    pipeline = Pipeline("p", (Propose(models=("a",), samples=6), Dropout(rate=0.5)))
    kept = {tuple(r.text for r in (await run(pipeline, Q, es)).responses[1]) for _ in range(20)}
    assert len(kept) > 1  # not the same proposers dropped on every request
    seeded = {tuple(r.text for r in (await run(pipeline, Q, es, seed=3)).responses[1]) for _ in range(5)}
    assert len(seeded) == 1


def _optillm_like(model: str = "m") -> Pipeline:
    return parse_pipeline("o", {"steps": [
        {"propose": {"models": [model], "samples": 3, "temperature": 1.0}},
        {"critique": {"models": [model], "temperature": 0.1}},
        {"aggregate": {"model": model, "inputs": ["propose", "critique"], "temperature": 0.1}},
    ]})


async def test_a_step_reads_the_earlier_steps_it_names_with_each_reference_labelled_by_where_it_came_from():
    """optillm's recipe: the final call sees the three proposals and the critique of them; the critique saw the
    proposals only. Before `inputs`, a step saw only the previous step's responses (the critique alone)."""
    def reply(messages, params, i):
        system = messages[0]["content"]
        if "Critique each one" in system:
            return "critique: answer 1 is wrong"
        if "### Reference" in system:
            return "final"
        return f"proposal {i}"

    engine = ScriptedEngine("m", reply=reply)
    pipeline = _optillm_like()
    assert [s.inputs for s in pipeline.steps] == [(), (), (1, 2)]
    result = await run(pipeline, [{"role": "user", "content": "q"}], {"m": engine})
    assert result.answer == "final"
    critique_prompt, final_prompt = engine.calls[1].messages[0]["content"], engine.calls[2].messages[0]["content"]
    assert critique_prompt.count("### Reference") == 3 and "critique: answer 1" not in critique_prompt
    assert final_prompt.count("### Reference") == 4
    assert "### Reference 1 (a proposed answer)\nproposal 0" in final_prompt
    assert "### Reference 4 (a critique of the answers)\ncritique: answer 1 is wrong" in final_prompt
    assert [s.inputs for s in result.trace.steps] == [0, 3, 4]


async def test_when_a_step_with_inputs_fails_the_answers_it_was_to_work_on_go_on_not_the_critique():
    def reply(messages, params, i):
        return "critique" if "### Reference" in messages[0]["content"] else f"proposal {i}"

    engines = {"m": ScriptedEngine("m", reply=reply), "bad": ScriptedEngine("bad", fail="out of memory")}
    pipeline = parse_pipeline("o", {"steps": [
        {"propose": {"models": ["m"], "samples": 2, "temperature": 1.0}},
        {"critique": {"models": ["m"]}},
        {"aggregate": {"model": "bad", "inputs": [1, 2]}},
    ]})
    result = await run(pipeline, [{"role": "user", "content": "q"}], engines)
    assert result.answer == "proposal 0"  # the first input's answers, not the critique
    assert [len(r) for r in result.responses] == [2, 1, 2]


@pytest.mark.parametrize(("inputs", "message"), [
    ([3], "inputs names step 3, but a step reads only earlier steps (earlier: 1 propose, 2 critique)"),
    (["synthesize"], "inputs names 'synthesize', but no earlier step is one"),
    ([0], "step numbers start at 1"),
])
def test_inputs_that_name_no_earlier_step_are_refused_at_load_naming_the_pipeline_and_step(inputs, message):
    steps = [{"propose": {"models": ["m"], "samples": 2, "temperature": 1.0}}, {"critique": {"models": ["m"]}},
             {"aggregate": {"model": "m", "inputs": inputs}}]
    with pytest.raises(PresetError, match="pipeline 'o', step 3") as err:
        parse_pipeline("o", {"steps": steps})
    assert message in str(err.value)
    with pytest.raises(PresetError, match="answers the conversation"):
        parse_pipeline("o", {"steps": [{"propose": {"models": ["m"], "inputs": [1]}}]})


def test_a_request_cannot_add_or_drop_layers_of_a_pipeline_whose_steps_read_earlier_steps_by_number():
    from serving.api.errors import APIError
    from serving.api.schemas import MoAOptions
    from serving.api.targets import apply_overrides

    with pytest.raises(APIError, match="moa.layers cannot change pipeline 'o'") as err:
        apply_overrides(_optillm_like(), MoAOptions(layers=4), {"m"})
    assert err.value.status == 400
    assert apply_overrides(_optillm_like(), MoAOptions(aggregator="m"), {"m"}).steps[2].inputs == (1, 2)
