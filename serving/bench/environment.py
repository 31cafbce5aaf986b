"""What a benchmark ran on, written into every results file."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = float("nan")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{len(os.sched_getaffinity(0))} cores ({cpu}), {memory:.0f} GiB, {gpu()}"


def gpu() -> str:
    """The GPUs by name, read through NVML as the planner reads them: asking torch would create a CUDA context
    on GPU 0 in this process before any engine starts, memory the plan did not count."""
    from collections import Counter

    from serving.placement.devices import PlanError, detect_gpus

    try:
        found = detect_gpus()
    except PlanError as exc:  # a CUDA_DEVICE_ORDER the plan refuses: the report still gets written
        return f"GPUs not read: {exc}"
    gpus = Counter(f"{g.name or 'GPU'} ({g.total_bytes / 2**30:.0f} GiB)" for g in found)
    return ", ".join(f"{count}x {name}" for name, count in gpus.items()) or "no GPU"

