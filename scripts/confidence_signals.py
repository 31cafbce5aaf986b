"""Which cheap signal predicts a model's errors on the built-in tasks (docs/BENCHMARKS.md, "Stopping early").

    .venv/bin/python scripts/confidence_signals.py [MODEL]      # default qwen2.5-coder-1.5b; ~3 min on 2 cores

Per task: the greedy answer (max_tokens 256) with its mean and least-likely-token log-probability and
finish reason, whether it is correct (the eval's scorers), and whether 2 seeded samples agree with it.
Prints the tasks from least to most confident token and each signal's AUROC for "this answer is wrong";
writes every row to /tmp/confidence-MODEL.json.
"""

from __future__ import annotations

import asyncio
import json
import sys

from moa import votes
from moa.engine import SamplingParams
from serving.bench.datasets import Task, load_tasks
from serving.bench.scoring import answer_spans, normalize, score
from serving.engines.pool import EnginePool
from serving.models.registry import load_registry


def comparable(task: Task, text: str) -> str | None:
    how = "number" if task.scorer == "numeric" else "choice" if task.scorer == "choice" else "text"
    if how != "text":
        return votes.normalize(text, how)
    spans = answer_spans(text)
    return normalize(spans[0]) if spans else None


def auroc(rows: list[dict], confidence: str) -> float:
    """How often a wrong answer is less confident than a right one (0.5: no signal)."""
    wrong = [r[confidence] for r in rows if not r["correct"]]
    right = [r[confidence] for r in rows if r["correct"]]
    pairs = [(w < c) + 0.5 * (w == c) for w in wrong for c in right]
    return sum(pairs) / len(pairs) if pairs else float("nan")


async def main(model: str) -> None:
    pool = EnginePool(load_registry(), [model])
    await pool.start()
    engine, tasks, slots = pool.engines[model], load_tasks(), asyncio.Semaphore(16)

    async def one(i: int, task: Task) -> dict:
        async with slots:
            greedy = await engine.generate(task.conversation(), SamplingParams(temperature=0, max_tokens=256,
                                                                               logprobs=True))
            sampled = await engine.generate(task.conversation(), SamplingParams(n=2, temperature=0.7, max_tokens=256,
                                                                                seed=1000 * i))
        first = greedy.completions[0]
        keys = [comparable(task, t) for t in [first.text, *sampled.texts]]
        return {"id": task.id, "category": task.category, "correct": score(task, first.text),
                "mean_logprob": first.mean_logprob, "min_logprob": first.min_logprob, "finish": first.finish_reason,
                "tokens": first.completion_tokens, "agree": float(keys[0] is not None and len(set(keys)) == 1)}

    try:
        rows = await asyncio.gather(*(one(i, t) for i, t in enumerate(tasks)))
    finally:
        await pool.close()
    with open(f"/tmp/confidence-{model}.json", "w") as f:
        json.dump(rows, f, indent=1)
    for r in sorted(rows, key=lambda r: r["min_logprob"]):
        print(f"{r['id']:>10} {r['category']:>16} correct={r['correct']!s:5} min={r['min_logprob']:6.2f} "
              f"mean={r['mean_logprob']:6.3f} {r['finish']:6} agree={bool(r['agree'])!s:5} tokens={r['tokens']}")
    right = sum(r["correct"] for r in rows)
    print(f"{model}: {right}/{len(rows)} correct; AUROC for a wrong answer: least likely token "
          f"{auroc(rows, 'min_logprob'):.2f}, mean log-probability {auroc(rows, 'mean_logprob'):.2f}, "
          f"agreement of 2 samples with it {auroc(rows, 'agree'):.2f}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-1.5b"))
