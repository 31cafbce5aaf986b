"""The `moa` command as a user runs it (a real subprocess, a real engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL

MOA = [sys.executable, "-m", "serving.cli"]
ROOT = Path(__file__).resolve().parent.parent


def moa(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*MOA, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200"})


def test_help_lists_commands():
    out = moa("--help")
    assert out.returncode == 0
    assert "run" in out.stdout and "models" in out.stdout


def test_models_list_shows_registry(local_model):
    local_model(SMALL)
    out = moa("models", "list")
    assert out.returncode == 0, out.stderr
    assert SMALL in out.stderr and "qwen2.5-coder-1.5b" in out.stderr and "(default)" in out.stderr


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
