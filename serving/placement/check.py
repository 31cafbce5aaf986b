"""Where each engine's GPU memory really is, against the plan (scripts/gpu_smoke.sh, step 3).

Comparing the CUDA_VISIBLE_DEVICES strings an EngineCore received with the plan proves only that the
strings match: CUDA may number the GPUs differently (CUDA_DEVICE_ORDER), and a worker may allocate
elsewhere. This reads what nvidia-smi says each process holds, on which GPU, maps each process to its
engine through MOA_ENGINE in its environment (serving/engines/vllm_engine.py sets it; workers inherit
it), and fails when memory sits on a GPU the plan did not give that engine, or a planned engine holds
none.

    python -m serving.placement.check PLAN.json    # exit 1 on a mismatch; prints what it saw
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    gpu_index: str
    used_mib: float


def problems(plan: dict, processes: list[GpuProcess], engine_of: Callable[[int], str | None]) -> list[str]:
    """What does not match the plan's `gpu.engines` (empty when everything is where it was planned)."""
    engines = plan["gpu"]["engines"]
    planned = {name: set(p["cuda_visible_devices"].split(",")) for name, p in engines.items()}
    found: dict[str, set[str]] = {name: set() for name in planned}
    out = []
    for proc in processes:
        name = engine_of(proc.pid)
        if name is None:
            out.append(f"pid {proc.pid} holds {proc.used_mib:.0f} MiB on GPU {proc.gpu_index} and is no engine's "
                       "(no MOA_ENGINE in its environment, or its /proc is not readable here: nvidia-smi in a "
                       "container may report host pids)")
        elif name not in planned:
            out.append(f"pid {proc.pid} ({name}) holds memory on GPU {proc.gpu_index}; the plan has no GPU for it")
        elif proc.gpu_index not in planned[name]:
            out.append(f"{name}: pid {proc.pid} holds {proc.used_mib:.0f} MiB on GPU {proc.gpu_index}, planned "
                       f"{sorted(planned[name])}")
        else:
            found[name].add(proc.gpu_index)
    for name, gpus in planned.items():
        if missing := gpus - found[name]:
            out.append(f"{name}: no memory on planned GPU(s) {sorted(missing)}")
    return out


def nvidia_smi_processes() -> list[GpuProcess]:
    def query(what: str, fields: str) -> list[list[str]]:
        text = subprocess.run(["nvidia-smi", f"--query-{what}={fields}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, check=True).stdout
        return [[f.strip() for f in line.split(",")] for line in text.splitlines() if line.strip()]

    index_of = {uuid: index for index, uuid in query("gpu", "index,uuid")}
    # used_memory is "[N/A]" where the driver does not report it per process (MIG, vGPU): the GPU still counts.
    return [GpuProcess(int(pid), index_of.get(uuid, uuid), float(used) if used.replace(".", "").isdigit() else 0.0)
            for pid, uuid, used in query("compute-apps", "pid,gpu_uuid,used_memory")]


def environ_of(pid: int) -> dict[str, str] | None:
    """A process's environment as it was started (None where /proc does not show it)."""
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def engine_of(pid: int) -> str | None:
    return (environ_of(pid) or {}).get("MOA_ENGINE")


def main(argv: list[str]) -> int:
    plan = json.load(open(argv[0]))
    processes = nvidia_smi_processes()
    for proc in processes:
        print(f"- pid {proc.pid} ({engine_of(proc.pid) or '?'}): GPU {proc.gpu_index}, {proc.used_mib:.0f} MiB")
    for name, p in plan["gpu"]["engines"].items():
        print(f"- planned: {name} on GPU(s) {p['cuda_visible_devices']}")
    found = problems(plan, processes, engine_of)
    for line in found:
        print(f"- MISMATCH: {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
