"""Fit a router from `moa eval` results: per model, P(correct | query embedding) by logistic regression.

Held-out figures come from k-fold cross-validation over the tasks: each task's scores are
predicted by a router that never saw it. On those predictions the routing rule of
`route` steps (moa/routing.py: the cheapest model predicted to succeed, else the
likeliest) is replayed at each threshold, and compared with always asking one model
on a cost-weighted score: accuracy − λ · (cost / the strongest model's cost).
The file written is refitted on every task, with the threshold that scored best.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moa.routing import choose
from serving.routing.embedder import EMBEDDER
from serving.routing.router_file import ModelRouter, RouterFile

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(6, 20))  # 0.30 … 0.95


@dataclass
class Outcomes:
    """What each model did on each task, from eval results: task ids, correct (tasks × models), tokens."""

    tasks: list[str]
    models: list[str]
    correct: np.ndarray  # bool, tasks × models
    tokens: np.ndarray  # completion tokens, tasks × models


def read_outcomes(paths: Sequence[Path]) -> tuple[Outcomes, list[str]]:
    """Single-model systems from results.json files (later files win), on the tasks every model answered.

    Returns the outcomes and the task files the evaluations name (task ids must not repeat across them).
    """
    per_model: dict[str, dict[str, tuple[bool, int]]] = {}
    task_files = set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        task_files.add(data.get("meta", {}).get("tasks"))
        for row in data["accuracy"]:
            if row["models"] != [row["system"]]:
                continue  # a pipeline, or a model swapped into one: not one model's own answer
            rows = data["responses"][row["system"]]
            per_model.setdefault(row["system"], {}).update(
                {r["task"]: (bool(r["correct"]), int(r["completion_tokens"])) for r in rows})
    if len(per_model) < 2:
        raise ValueError(f"routing needs results of at least two single models; found {sorted(per_model) or 'none'} "
                         "(run `moa eval -s MODEL_A -s MODEL_B …` first)")
    models = sorted(per_model)
    tasks = [t for t in next(iter(per_model.values())) if all(t in per_model[m] for m in models)]
    correct = np.array([[per_model[m][t][0] for m in models] for t in tasks], dtype=bool)
    tokens = np.array([[per_model[m][t][1] for m in models] for t in tasks], dtype=float)
    return Outcomes(tasks, models, correct, tokens), sorted(task_files - {None}) or ["tasks.jsonl"]


def _fit_one(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """Weights and bias of a logistic regression; a smoothed constant where the labels are all one class."""
    if y.all() or not y.any():
        rate = (y.sum() + 1) / (len(y) + 2)
        return np.zeros(x.shape[1]), math.log(rate / (1 - rate))
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    return clf.coef_[0], float(clf.intercept_[0])


def _predict(w: np.ndarray, b: float, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(x @ w + b)))


def held_out_scores(x: np.ndarray, outcomes: Outcomes, *, folds: int, c: float, seed: int = 0) -> np.ndarray:
    """Predicted P(correct), tasks × models, each task predicted by a fit that left it out."""
    order = np.random.default_rng(seed).permutation(len(outcomes.tasks))
    scores = np.zeros(outcomes.correct.shape)
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        for j in range(len(outcomes.models)):
            w, b = _fit_one(x[train], outcomes.correct[train, j], c)
            scores[fold, j] = _predict(w, b, x[fold])
    return scores


def _auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    if y.all() or not y.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def replay(scores: np.ndarray, outcomes: Outcomes, costs: Mapping[str, float], threshold: float) -> np.ndarray:
    """Which model the `route` rule asks first, per task (column index), at this threshold."""
    by_cost = sorted(outcomes.models, key=lambda m: (costs[m], outcomes.models.index(m)))
    picks = []
    for row in scores:
        choice = choose(dict(zip(outcomes.models, row, strict=True)), by_cost, threshold)
        picks.append(outcomes.models.index(choice.first))
    return np.array(picks)


def policy_row(name: str, picks: np.ndarray, outcomes: Outcomes, weights: np.ndarray, strongest_cost: float,
               lam: float) -> dict:
    rows = np.arange(len(picks))
    accuracy = float(outcomes.correct[rows, picks].mean())
    cost = float((outcomes.tokens[rows, picks] * weights[picks]).mean())
    share = {m: float((picks == j).mean()) for j, m in enumerate(outcomes.models)}
    return {"policy": name, "accuracy": accuracy, "cost_per_task": cost, "relative_cost": cost / strongest_cost,
            "score": accuracy - lam * cost / strongest_cost, "share": share}


def fit_router(x: np.ndarray, outcomes: Outcomes, costs: Mapping[str, float], *, folds: int = 5, c: float = 1.0,
               lam: float = 0.1, sources: Sequence[str] = ()) -> RouterFile:
    """Cross-validated figures, the best threshold, and the router refitted on every task."""
    weights = np.array([costs[m] for m in outcomes.models])
    rate = outcomes.correct.mean(axis=0)
    strongest = int(np.argmax(rate))
    strongest_cost = float((outcomes.tokens[:, strongest] * weights[strongest]).mean())
    scores = held_out_scores(x, outcomes, folds=folds, c=c)
    n = len(outcomes.tasks)

    prediction = {}
    for j, model in enumerate(outcomes.models):
        y, p = outcomes.correct[:, j], scores[:, j]
        prediction[model] = {"base_rate": float(y.mean()), "accuracy": float(((p >= 0.5) == y).mean()),
                             "majority_accuracy": float(max(y.mean(), 1 - y.mean())), "auroc": _auroc(y, p),
                             "brier": float(((p - y) ** 2).mean()),
                             "brier_base_rate": float(((y.mean() - y) ** 2).mean())}
    always = [policy_row(f"always {m}", np.full(n, j), outcomes, weights, strongest_cost, lam)
              for j, m in enumerate(outcomes.models)]
    oracle_picks = np.array([next((j for j in np.argsort(weights, kind="stable") if outcomes.correct[i, j]),
                                  strongest) for i in range(n)])
    oracle = policy_row("oracle (cheapest correct model)", oracle_picks, outcomes, weights, strongest_cost, lam)
    routed = [policy_row(f"routed at {t:.2f}", replay(scores, outcomes, costs, t), outcomes, weights,
                         strongest_cost, lam) | {"threshold": t} for t in THRESHOLDS]
    best = max(routed, key=lambda r: (round(r["score"], 9), r["threshold"]))
    models = {}
    for j, model in enumerate(outcomes.models):
        w, b = _fit_one(x, outcomes.correct[:, j], c)
        models[model] = ModelRouter(weights=[float(v) for v in w], bias=b, cost=costs[model],
                                    train_accuracy=float(rate[j]))
    fit = {"tasks": n, "folds": folds, "C": c, "lambda": lam, "sources": list(sources),
           "strongest": outcomes.models[strongest], "prediction": prediction, "always": always, "oracle": oracle,
           "routed": routed, "best": best,
           "beats_strongest": best["score"] > always[strongest]["score"]}
    return RouterFile(embedder=EMBEDDER, dimensions=x.shape[1], threshold=best["threshold"], models=models, fit=fit)
