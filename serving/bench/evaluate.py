"""`moa eval`: answer a suite's items with single models and pipelines, score them, judge them pairwise.

A system is a model name (one greedy call, the single-model baseline, or with `--samples N` one
n=N request for pass@k) or a pipeline name, optionally with `@before` / `@after` to place every
synthesis step's references before or after the conversation. Systems that use the same models
share one engine pool; each pool has the machine to itself, so seconds per correct answer compare.
The suite (serving/bench/eval_suites) gives the items and grades the answers.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from moa.context import CodeRunner
from moa.engine import ChatMessage, Engine, SamplingParams
from moa.pipeline import Pipeline
from moa.routing import Scorer
from moa.runner import Prices
from moa.steps import Propose
from serving.bench.eval_suites import Item, Published, Suite
from serving.bench.eval_suites.tasks import TaskSuite
from serving.bench.measure import RequestSample, generation_request, pipeline_request, run_level
from serving.bench.stats import mean, pass_at_k, wilson_interval
from serving.models.registry import Registry

JUDGE_SYSTEM = (
    "You are an impartial judge. Compare two responses to the user's request below. Prefer the response that is "
    "correct; if both are correct or both wrong, prefer the clearer and more helpful one. Ignore length and the "
    "order in which the responses are shown."
)
# MT-Bench's pairwise format: a short comparison first, then a bracketed verdict (C: a tie). A verdict
# alone ("reply with one letter") left the 1.5B judge choosing the first-shown response every time.
JUDGE_QUESTION = ("Compare the two responses in two or three sentences, then give your verdict on the last line, "
                  "exactly as [[A]] if response A is better, [[B]] if response B is better, or [[C]] for a tie.")
JUDGE_MAX_TOKENS = 192
PASS_AT = (1, 5, 10)  # pass@k reported for k up to the samples per item


@dataclass
class System:
    label: str
    # What runs: in-process, the pipeline; behind `moa eval --url`, what the served name stands for (a served
    # model: one Propose step; a served pipeline: no steps, its models in `served_models`).
    pipeline: Pipeline
    samples: int = 1  # a single model's answers per item, from one n=samples request (pass@k)
    served: Literal["model", "pipeline"] | None = None  # None: in-process
    served_models: tuple[str, ...] = ()

    def models(self) -> tuple[str, ...]:
        return self.served_models or self.pipeline.models()

    @property
    def single_model(self) -> bool:
        """One model answering alone under its own name: the rows published figures and routers are about."""
        return self.models() == (self.label,)


@dataclass
class SystemResult:
    system: System
    samples: list[RequestSample]
    wall_s: float
    correct: dict[str, bool] = field(default_factory=dict)  # item id -> its (first) answer scored correct
    passed: dict[str, list[bool]] = field(default_factory=dict)  # item id -> each sample's verdict (pass@k)
    scoring_s: float = 0.0


def single_model(name: str, *, max_tokens: int | None, samples: int = 1, temperature: float | None = None) -> System:
    """A model alone: greedy, or with samples > 1 one n=samples request at `temperature` (default 0.8)."""
    if temperature is None:
        temperature = 0.8 if samples > 1 else 0.0
    if samples > 1 and temperature <= 0:
        raise ValueError(f"--samples {samples} needs --temperature above 0 (greedy samples would be identical)")
    return System(name, Pipeline(name, (Propose(models=(name,), temperature=temperature, max_tokens=max_tokens or 512,
                                                samples=samples),)), samples)


def resolve_system(registry: Registry, text: str, mapping: Mapping[str, str], max_tokens: int | None, *,
                   samples: int = 1, temperature: float | None = None) -> System:
    """"qwen2.5-coder-1.5b", "self-moa" or "self-moa@after" -> a pipeline to run.

    `mapping` (--swap) applies to pipelines only: a model named as a system is that model. `samples` and
    `temperature` apply to single models only: a pipeline writes one answer with its own sampling."""
    name, _, layout = text.partition("@")
    if layout and layout not in ("before", "after"):
        raise ValueError(f"system {text!r}: the layout after @ must be before or after")
    if name in registry.models or registry.adapter_of(name) is not None:
        if layout:
            raise ValueError(f"system {text!r}: a layout applies to pipelines, not to a single model")
        return single_model(name, max_tokens=max_tokens, samples=samples, temperature=temperature)
    pipeline = registry.pipeline(name).with_models(dict(mapping))
    if max_tokens:
        pipeline = pipeline.with_max_tokens(max_tokens)
    if layout:
        pipeline = pipeline.with_layout(layout)  # type: ignore[arg-type]
    return System(text, pipeline)


async def answer_tasks(system: System, tasks: Sequence[Item], engines: Mapping[str, Engine], *, concurrency: int,
                       seed: int | None, on_done: Callable[[RequestSample], None] | None = None,
                       prices: Prices | None = None, scorers: Mapping[str, Scorer] | None = None,
                       suite: Suite | None = None, code_runner: CodeRunner | None = None,
                       positions: Sequence[int] | None = None) -> SystemResult:
    """Every item answered in-process (closed loop, `concurrency` in flight), then scored by `suite`.

    Item i is seeded seed + 1000 * i, or seed + 1000 * positions[i]: a rerun of some items (`moa eval --ids`)
    seeds each as the whole run did.

    `code_runner`: the sandbox a pipeline's `check` steps run responses in (the conversation's own examples,
    never the suite's tests: those reach only the scorer)."""
    async def request(i: int, t0: float) -> RequestSample:
        item_seed = None if seed is None else seed + 1000 * (positions[i] if positions is not None else i)
        if system.samples > 1:
            step = system.pipeline.steps[0]
            params = SamplingParams(n=system.samples, temperature=step.temperature, max_tokens=step.max_tokens,
                                    seed=item_seed)
            return await generation_request(engines[step.models[0]], tasks[i].conversation(), params, i, t0)
        return await pipeline_request(system.pipeline, tasks[i].conversation(), engines, i, t0,
                                      seed=item_seed, prices=prices, scorers=scorers, code_runner=code_runner)

    level = await run_level(system.label, system.pipeline.name, request, concurrency=concurrency,
                            requests=len(tasks), on_done=on_done)
    return await score_answers(SystemResult(system, level.samples, level.wall_s), tasks, suite or TaskSuite())


async def score_answers(result: SystemResult, items: Sequence[Item], suite: Suite) -> SystemResult:
    """Each scored item's answers graded by the suite (every sample of an n > 1 request); a failed request
    counts as wrong answers. Runs after the answers are in, so it adds nothing to the systems' wall time."""
    started = time.perf_counter()

    async def verdicts(item: Item, sample: RequestSample) -> list[bool]:
        if not sample.ok:
            return [False] * result.system.samples
        texts = sample.answers or [sample.answer]
        return list(await asyncio.gather(*(suite.score(item, text) for text in texts)))

    pairs = [(item, sample) for item, sample in zip(items, result.samples, strict=True) if item.scored]
    for (item, _), passed in zip(pairs, await asyncio.gather(*(verdicts(*p) for p in pairs)), strict=True):
        result.passed[item.id] = passed
        result.correct[item.id] = passed[0]
    result.scoring_s = time.perf_counter() - started
    return result


def accuracy_row(result: SystemResult, tasks: Sequence[Item], published: Published | None = None) -> dict:
    """Accuracy with a 95% Wilson interval, per category, and what each correct answer cost; with several samples
    per item, accuracy is pass@1 (the mean share of passing samples) and pass@k sits beside it."""
    scored = [t for t in tasks if t.scored]
    passed = [result.passed.get(t.id) or [False] * result.system.samples for t in scored]
    shares = [sum(p) / len(p) for p in passed]  # per item: its samples' pass rate (0 or 1 for one sample)
    right = sum(shares)
    passing = sum(sum(p) for p in passed)  # passing samples, over every sample
    low, high = wilson_interval(right, len(scored))
    ok = [s for s in result.samples if s.ok]
    categories: dict[str, list[float]] = {}
    for t, share in zip(scored, shares, strict=True):
        categories.setdefault(t.category, []).append(share)
    # What the scored answers cost: open prompts (pairwise only) are not part of it.
    tokens = sum(s.completion_tokens for t, s in zip(tasks, result.samples, strict=True) if s.ok and t.scored)
    n = result.system.samples
    return {
        "system": result.system.label,
        "models": list(result.system.models()),
        "tasks": len(scored),
        "correct": int(right) if right == int(right) else right,  # with samples: the expected count at pass@1
        "accuracy": right / len(scored) if scored else None,
        "ci95": [low, high],
        "by_category": {c: sum(v) / len(v) for c, v in categories.items()},
        "samples": n,
        "samples_passed": passing,
        "pass_at": {str(k): mean([pass_at_k(len(p), sum(p), k) for p in passed]) for k in PASS_AT if k <= n},
        "published": None if published is None else {"pass@1": published.pass_at_1, "source": published.source},
        "errors": len(result.samples) - len(ok),
        "engine_calls_per_task": mean([s.engine_calls for s in ok]),
        "completion_tokens_per_task": mean([s.completion_tokens for s in ok]),
        "prompt_tokens_per_task": mean([s.prompt_tokens for s in ok]),
        "completion_tokens_per_correct": tokens / passing if passing else None,
        "wall_s": result.wall_s,
        "seconds_per_task": result.wall_s / len(tasks) if tasks else None,
        "seconds_per_correct": result.wall_s / passing if passing else None,
        "scoring_s": result.scoring_s,
        "latency_mean_s": mean([s.latency_s for s in ok]),
    }


# -- pairwise ---------------------------------------------------------------------------------


def judge_messages(conversation: Sequence[ChatMessage], first: str, second: str) -> list[ChatMessage]:
    request = "\n".join(f"{m['role']}: {m['content']}" for m in conversation)
    body = (f"[User request]\n{request}\n\n[Response A]\n{first.strip()}\n\n[Response B]\n{second.strip()}\n\n"
            f"{JUDGE_QUESTION}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": body}]


def parse_verdict(text: str) -> str | None:
    """The last [[A]], [[B]] or [[C]] (tie) in the judge's reply; a bare letter reply counts too."""
    found = re.findall(r"\[\[\s*([ABC])\s*\]\]", text)
    if found:
        return found[-1]
    bare = text.strip().strip("*[]().:").strip()
    return bare if bare in ("A", "B", "C") else None


@dataclass
class PairwiseResult:
    system: str
    reference: str
    judge: str
    scores: list[float]  # per task, the mean of both orders' points: > 0.5 a win, 0.5 a tie, < 0.5 a loss
    consistent: int  # both orders agreed
    unparsed: int  # verdicts without an A or B
    verdicts: list[tuple[str | None, str | None]] = field(default_factory=list)  # (system first, system second)

    def row(self) -> dict:
        n = len(self.scores)
        wins = sum(self.scores)
        low, high = wilson_interval(wins, n)
        return {"system": self.system, "reference": self.reference, "judge": self.judge, "pairs": n,
                "win_rate": wins / n if n else None, "ci95": [low, high],
                "wins": sum(s > 0.5 for s in self.scores), "ties": sum(s == 0.5 for s in self.scores),
                "losses": sum(s < 0.5 for s in self.scores),
                "order_consistency": self.consistent / n if n else None, "unparsed_verdicts": self.unparsed,
                "first_position_rate": self.first_position_rate(), "verdicts": self.verdicts}

    def first_position_rate(self) -> float | None:
        """Share of decided verdicts that chose the response shown first: 0.5 is unbiased, 1.0 is always "A"."""
        picks = [v for pair in self.verdicts for v in pair if v in ("A", "B")]
        return sum(v == "A" for v in picks) / len(picks) if picks else None


@dataclass(frozen=True, slots=True)
class BothOrders:
    """A judge's verdicts on answer `mine` against `theirs`, shown first and then second."""

    first: str | None  # "A", "B", "C" (tie) or None (no verdict), with `mine` shown as A
    second: str | None  # with `mine` shown as B

    @property
    def points(self) -> tuple[float, float]:
        """Points for `mine` in each order: 1 preferred, 0.5 tie or no verdict, 0 the other preferred."""
        return _POINTS_FIRST.get(self.first, 0.5), _POINTS_SECOND.get(self.second, 0.5)

    @property
    def score(self) -> float:
        return sum(self.points) / 2


async def judge_both_orders(judge: Engine, conversation: Sequence[ChatMessage], mine: str, theirs: str,
                            gate: asyncio.Semaphore) -> BothOrders:
    """Each pair judged twice, `mine` shown first then second: position bias cancels out."""
    params = SamplingParams(temperature=0.0, max_tokens=JUDGE_MAX_TOKENS)

    async def verdict(messages: list[ChatMessage]) -> str | None:
        async with gate:
            return parse_verdict((await judge.generate(messages, params)).texts[0])

    return BothOrders(*await asyncio.gather(verdict(judge_messages(conversation, mine, theirs)),
                                            verdict(judge_messages(conversation, theirs, mine))))


async def judge_pairs(judge: Engine, tasks: Sequence[Item], system: SystemResult, reference: SystemResult, *,
                      concurrency: int) -> PairwiseResult:
    """Each task's pair of answers judged in both orders (`judge_both_orders`)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(task: Item, mine: RequestSample, theirs: RequestSample) -> tuple[float, bool, int, tuple]:
        judged = await judge_both_orders(judge, task.conversation(), mine.answer, theirs.answer, gate)
        first, second = judged.first, judged.second
        unparsed = (first is None) + (second is None)
        agreed = first is not None and second is not None and judged.points[0] == judged.points[1]
        return judged.score, agreed, unparsed, (first, second)

    pairs = [(t, m, r) for t, m, r in zip(tasks, system.samples, reference.samples, strict=True) if m.ok and r.ok]
    outcomes = await asyncio.gather(*(one(*p) for p in pairs))
    return PairwiseResult(system.system.label, reference.system.label, judge.name,
                          [o[0] for o in outcomes], sum(o[1] for o in outcomes), sum(o[2] for o in outcomes),
                          [o[3] for o in outcomes])


_POINTS_FIRST = {"A": 1.0, "B": 0.0, "C": 0.5}  # the system's answer shown as A
_POINTS_SECOND = {"A": 0.0, "B": 1.0, "C": 0.5}  # the system's answer shown as B


def group_by_models(systems: Sequence[System]) -> list[list[System]]:
    """Systems that need the same engines run back to back on one pool (fewer engine starts)."""
    groups: dict[tuple[str, ...], list[System]] = {}
    for system in systems:
        groups.setdefault(tuple(sorted(system.pipeline.models())), []).append(system)
    return list(groups.values())


def routing_rows(registry: Registry, systems: Sequence[System], results: Mapping[str, SystemResult]) -> list[dict]:
    """Per system with a `route` step: who its router asked first, how often it escalated, and the router's
    held-out figures from its fit (`moa route fit`)."""
    rows = []
    for system in systems:
        routers = [r for s in system.pipeline.steps if (r := getattr(s, "router", None))]
        if not routers:
            continue
        fit = registry.scorer(routers[0]).router.fit
        ok = [s for s in results[system.label].samples if s.ok and s.calls]
        firsts = Counter(s.calls[0].split(" x")[0] for s in ok)
        rows.append({
            "system": system.label, "router": routers[0], "path": str(registry.router_path(routers[0])),
            "first_asked": {m: n / len(ok) for m, n in firsts.most_common()} if ok else {},
            "escalated": sum(len(s.calls) > 1 for s in ok) / len(ok) if ok else None,
            "held_out_auroc": {m: p["auroc"] for m, p in fit.get("prediction", {}).items()},
            "held_out_best": fit.get("best"), "fit_tasks": fit.get("tasks"),
            "beats_strongest": fit.get("beats_strongest"),
        })
    return rows
