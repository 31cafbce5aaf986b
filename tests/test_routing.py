"""Routers: fitting from eval results, the router file, models.yaml's `routers:`, the real embedding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moa.routing import choose
from serving.models.registry import RegistryError, load_registry
from serving.routing.fit import Outcomes, fit_router, read_outcomes
from serving.routing.router_file import read_router
from serving.routing.scorer import EmbeddingScorer

MODELS = """
default_model: small
models:
  small: {backend: vllm, source: {kind: hf-dir, path: /m/small}}
  big: {backend: vllm, source: {kind: hf-dir, path: /m/big}}
routers:
  r: {path: router.json}
pipelines:
  routed:
    steps:
      - route: {models: [small, big], router: r}
"""


def synthetic(n: int = 80, seed: int = 0) -> tuple[np.ndarray, Outcomes]:
    """Two kinds of query: the small model is right only on the first kind, the big one on both."""
    rng = np.random.default_rng(seed)
    kind = np.arange(n) % 2
    x = rng.normal(size=(n, 8)) * 0.3
    x[:, 0] += np.where(kind == 0, 1.0, -1.0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    correct = np.stack([kind == 0, np.ones(n, dtype=bool)], axis=1)
    tokens = np.full((n, 2), 50.0)
    return x, Outcomes([f"t{i}" for i in range(n)], ["small", "big"], correct, tokens)


def test_fit_learns_who_succeeds_and_routes_cheaply_on_held_out_tasks():
    x, outcomes = synthetic()
    router = fit_router(x, outcomes, {"small": 0.2, "big": 1.0}, folds=4, c=10.0)
    fit = router.fit
    assert fit["prediction"]["small"]["auroc"] > 0.95 and fit["prediction"]["big"]["auroc"] is None  # big: always
    assert fit["strongest"] == "big" and fit["beats_strongest"]
    best = fit["best"]
    assert best["accuracy"] == 1.0 and best["relative_cost"] == pytest.approx(0.6)  # half the tasks to the small one
    assert 0.3 <= router.threshold <= 0.95 and len(router.models["small"].weights) == router.dimensions == 8
    p = EmbeddingScorer(router, "r").predict(x[:2], ["small", "big"])  # the regressions, given embeddings
    assert p["small"][0] > 0.5 > p["small"][1] and p["big"].min() > 0.9


def test_fit_says_so_when_the_query_says_nothing_about_success():
    x, outcomes = synthetic()
    outcomes.correct[:, 0] = np.random.default_rng(1).random(len(outcomes.tasks)) < 0.5  # small: coin flips
    fit = fit_router(x, outcomes, {"small": 0.2, "big": 1.0}, folds=4).fit
    assert not fit["beats_strongest"] or fit["best"]["accuracy"] >= 0.9


def results_file(tmp_path: Path, name: str, systems: dict[str, list[tuple[str, bool, int]]]) -> Path:
    data = {"meta": {"tasks": "tasks.jsonl"},
            "accuracy": [{"system": s, "models": [s]} for s in systems] + [{"system": "moa", "models": ["a", "b"]}],
            "responses": {s: [{"task": t, "correct": c, "completion_tokens": k} for t, c, k in rows]
                          for s, rows in systems.items()} | {"moa": []}}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_read_outcomes_takes_single_models_on_common_tasks_later_files_winning(tmp_path):
    first = results_file(tmp_path, "1.json", {"a": [("t1", True, 5), ("t2", False, 6)], "b": [("t1", False, 9)]})
    second = results_file(tmp_path, "2.json", {"b": [("t1", True, 7), ("t2", True, 8)]})
    outcomes, tasks = read_outcomes([first, second])
    assert outcomes.models == ["a", "b"] and outcomes.tasks == ["t1", "t2"] and tasks == ["tasks.jsonl"]
    assert outcomes.correct.tolist() == [[True, True], [False, True]] and outcomes.tokens[0].tolist() == [5, 7]
    with pytest.raises(ValueError, match="at least two single models"):
        read_outcomes([second])


def test_choose_reads_models_cheapest_first():
    scores = {"tiny": 0.2, "small": 0.7, "big": 0.9}
    assert choose(scores, ["tiny", "small", "big"], 0.6).first == "small"
    assert choose(scores, ["tiny", "small", "big"], 0.95).first == "big"
    assert choose(scores, ["tiny", "small", "big"], 0.1).first == "tiny"
    assert choose(scores, ["tiny", "small", "big"], 0.1).strongest == "big"


def write_registry(tmp_path: Path, router_models: list[str], text: str = MODELS) -> Path:
    x, outcomes = synthetic()
    outcomes.models = router_models
    router = fit_router(x, outcomes, dict.fromkeys(router_models, 1.0), folds=2)
    (tmp_path / "router.json").write_text(router.model_dump_json())
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_registry_resolves_router_files_next_to_models_yaml(tmp_path):
    reg = load_registry(write_registry(tmp_path, ["small", "big"]))
    assert reg.router_path("r") == tmp_path / "router.json" and set(reg.scorers()) == {"r"}
    assert read_router(reg.router_path("r")).models.keys() == {"small", "big"}


@pytest.mark.parametrize(("router_models", "text", "message"), [
    (["small", "other"], MODELS, r"router 'r' \(.*router.json\) has no prediction for \['big'\]"),
    (["small", "big"], MODELS.replace("router: r", "router: nope"), "unknown router 'nope'; known: r"),
    (["small", "big"], MODELS.replace("path: router.json", "path: missing.json"), "missing.json: cannot read"),
])
def test_registry_rejects_routers_that_cannot_serve_their_steps(tmp_path, router_models, text, message):
    with pytest.raises(RegistryError, match=message):
        load_registry(write_registry(tmp_path, router_models, text))


def test_the_shipped_router_knows_every_model_of_the_routed_preset():
    reg = load_registry()
    router = read_router(reg.router_path("embedded"))
    assert set(reg.pipeline("routed").models()) <= set(router.models)
    assert router.fit["tasks"] == 90 and set(router.fit["prediction"]) == set(router.models)


async def test_the_embedding_scorer_reads_the_query_offline():
    """The real all-MiniLM-L6-v2 from its PyPI package: unit vectors, similar queries closer, scores in (0, 1)."""
    from serving.routing.embedder import embed

    v = embed(["What is 12 times 7?", "Compute 12 multiplied by 7.", "Who wrote Hamlet?"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2]
    scorer = load_registry().scorer("embedded")
    scores = await scorer.score([{"role": "user", "content": "What is 12 times 7?"}], ["qwen2.5-coder-1.5b"])
    assert 0 < scores["qwen2.5-coder-1.5b"] < 1
