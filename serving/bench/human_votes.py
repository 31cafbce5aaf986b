"""Human votes from the playground beside a judge model's verdicts on the same answers.

`moa eval --votes FILE` reads the compare view's JSONL (serving/api/votes.py), asks the
judge about each voted pair in both orders (as `--pairwise` does, so position bias cancels
out), and reports per pair of targets the human win rate, the judge's, and how often the
two agree: whether the judge can stand in for people on this kind of prompt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from moa.engine import Engine
from serving.bench.evaluate import judge_both_orders

# A person's verdict as points for side a; "both bad" is a tie between them (as in Chatbot Arena's ratings).
_HUMAN = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}


def _side(points: float) -> str:
    return "first" if points > 0.5 else "second" if points < 0.5 else "even"


async def judge_votes(judge: Engine, votes: Sequence[dict], *, concurrency: int = 8) -> list[dict]:
    """One row per pair of targets (in name order) and a last row over all votes."""
    gate = asyncio.Semaphore(concurrency)
    judged = await asyncio.gather(*(judge_both_orders(judge, v["messages"], v["a"]["answer"], v["b"]["answer"], gate)
                                    for v in votes))
    judge_points = [j.score for j in judged]  # points for side a
    pairs: dict[tuple[str, str], list[tuple[dict, float]]] = {}
    for vote, points in zip(votes, judge_points, strict=True):
        key = tuple(sorted((vote["a"]["target"], vote["b"]["target"])))
        pairs.setdefault(key, []).append((vote, points))
    rows = [_row(list(key), judge.name, entries) for key, entries in sorted(pairs.items())]
    if len(rows) > 1:  # over every vote only the agreement means something (no one target to win)
        total = _row(["all pairs", ""], judge.name, [e for entries in pairs.values() for e in entries])
        rows.append({**total, "human_win_rate": None, "judge_win_rate": None})
    return rows


def _row(pair: list[str], judge: str, entries: list[tuple[dict, float]]) -> dict:
    """Human and judge points for the pair's first-named target, and their agreement (first / second / even)."""
    human, machine = [], []
    for vote, judge_points in entries:
        first_is_a = vote["a"]["target"] == pair[0]
        h = _HUMAN[vote["verdict"]]
        human.append(h if first_is_a else 1 - h)
        machine.append(judge_points if first_is_a else 1 - judge_points)
    agree = [_side(h) == _side(m) for h, m in zip(human, machine, strict=True)]
    decisive = [a for a, h in zip(agree, human, strict=True) if h != 0.5]
    verdicts = [vote["verdict"] for vote, _ in entries]
    return {"pair": pair, "judge": judge, "votes": len(entries),
            "human_win_rate": sum(human) / len(human), "judge_win_rate": sum(machine) / len(machine),
            "agreement": sum(agree) / len(agree),
            "agreement_decisive": sum(decisive) / len(decisive) if decisive else None,
            "ties": verdicts.count("tie"), "both_bad": verdicts.count("both_bad")}
