"""`moa bench` and `moa eval` end to end on real vLLM CPU engines (SmolLM2), as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parent.parent
SWAP = f"qwen2.5-coder-1.5b={SMALL}"


def moa(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "serving.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"moa {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_bench_runs_every_baseline_and_writes_tables_json_and_plots(local_model, tmp_path):
    local_model(SMALL)
    # One concurrency level: every system and table is exercised; the curve over levels is the benchmark's job
    # (each level is another round of real requests on a 2-core CI machine).
    proc = moa("bench", "-p", "self-moa", "--swap", SWAP, "--max-tokens", "8", "-n", "2", "--concurrency", "2",
               "--sequential-requests", "1", "-o", str(tmp_path))
    data = json.loads((tmp_path / "results.json").read_text())
    entry = data["pipelines"][0]
    systems = {(lv["system"], lv["concurrency"]) for lv in entry["levels"]}
    assert systems == {("moa", 2), ("split-n", 2), ("sequential", 1), ("http", 2)}
    assert all(lv["errors"] == 0 for lv in entry["levels"]), entry["levels"]
    moa_level = next(lv for lv in entry["levels"] if lv["system"] == "moa" and lv["concurrency"] == 2)
    assert moa_level["per_request"]["engine_calls"] == 2  # n=6 proposals in one request, then the aggregate
    assert moa_level["output_tokens_per_s"] > 0 and moa_level["ttft_s"]["p50"] is not None
    assert entry["raw"]["calls"] == 4 and entry["raw"]["tokens_per_s"] > 0  # 2 requests x 2 calls, replayed
    assert [row["concurrency"] for row in entry["comparison"]] == [2]
    assert all(row["efficiency"] and row["vs_http"] and row["vs_split_n"] for row in entry["comparison"])
    assert (tmp_path / "throughput.png").stat().st_size > 5000
    assert (tmp_path / "latency_cdf.png").stat().st_size > 5000
    assert "efficiency (a)" in (tmp_path / "summary.md").read_text()
    assert "moa against the baselines" in proc.stdout  # the rich tables are output: stdout


def test_eval_scores_and_judges_pairs_in_both_orders(local_model, tmp_path):
    local_model(SMALL)
    proc = moa("eval", "-s", SMALL, "-s", "self-moa@after", "--swap", SWAP, "--limit", "4", "--max-tokens", "16",
               "--pairwise", SMALL, "--judge", SMALL, "-o", str(tmp_path))
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {row["system"]: row for row in data["accuracy"]}
    assert set(rows) == {SMALL, "self-moa@after"}
    assert rows[SMALL]["tasks"] == 4 and rows[SMALL]["engine_calls_per_task"] == 1
    assert rows["self-moa@after"]["engine_calls_per_task"] == 2
    assert 0 <= rows[SMALL]["ci95"][0] <= rows[SMALL]["ci95"][1] <= 1
    (pair,) = data["pairwise"]
    assert pair["system"] == "self-moa@after" and pair["reference"] == SMALL and pair["pairs"] == 4
    assert pair["wins"] + pair["ties"] + pair["losses"] == 4
    assert len(data["responses"][SMALL]) == 4 and all(r["answer"] for r in data["responses"][SMALL])
    assert "accuracy [95% CI]" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "pareto.png").stat().st_size > 10_000  # accuracy vs tokens, with the Pareto front
    shown = proc.stdout.splitlines()  # the terminal tables, on stdout
    assert any(line.startswith(SMALL) and "/4" in line for line in shown), proc.stdout
    wtl = f"{pair['wins']}/{pair['ties']}/{pair['losses']}"
    assert any(line.startswith("self-moa@after") and wtl in line for line in shown), proc.stdout  # pairwise
