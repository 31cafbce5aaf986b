"""The engines' vLLM logging config: vLLM's own default, less the LD_PRELOAD advice (no engine starts)."""

from __future__ import annotations

import json
import subprocess
import sys

from serving.engines.vllm_logging import engine_logging_env

# What vLLM does in each engine process: build LoggingConfig from the environment and apply it.
CHILD = """
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging, init_logger
configure_logging(LoggingConfig())
log = init_logger("vllm.v1.worker.cpu_worker")
log.warning("%s is not found in LD_PRELOAD. For best performance, please follow ...", "libtcmalloc")
log.warning("Speculative decoding on CPU without Intel OpenMP in LD_PRELOAD will cause significant loss.")
log.warning("kept: any other warning")
"""


def _child_output(env: dict[str, str]) -> str:
    import os

    done = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr  # vLLM logs to stdout by default (VLLM_LOGGING_STREAM)


def test_the_engine_config_drops_only_the_preload_advice(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)
    env = engine_logging_env()
    config = json.loads(open(env["VLLM_LOGGING_CONFIG_PATH"]).read())
    assert config["handlers"]["vllm"]["filters"] == ["moa_drop_preload_advice"]
    out = _child_output(env)
    assert "is not found in LD_PRELOAD" not in out
    assert "kept: any other warning" in out and "[" in out  # vLLM's own format: "(pid) WARNING date [file:line]"
    assert "Speculative decoding on CPU without Intel OpenMP" in out  # actionable: it stays
    # Without it, vLLM's default prints the advice (so the assertion above can fail).
    assert "is not found in LD_PRELOAD" in _child_output({})


def test_a_users_own_vllm_logging_wins(monkeypatch, tmp_path):
    mine = tmp_path / "logging.json"
    mine.write_text("{}")
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", str(mine))
    assert engine_logging_env() == {}
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH")
    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "0")
    assert engine_logging_env() == {}
