"""What this machine is: its CPU's kernel-relevant flags and memory, whether vLLM runs on the CPU, which vLLM.

Facts only, read from the machine; the plan (serving/placement/plan.py) and the engines read them here.
"""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

# Flags that select different bf16/fp16 kernel paths in vLLM-CPU, oneDNN and torch.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "amx_int8")


@cache
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def cpu_summary() -> str:
    """e.g. 'Intel(R) Xeon(R) Platinum 8481C; avx512_bf16 amx_tile amx_bf16' (the kernel-relevant flags)."""
    model, flags = cpu_model_and_flags()
    present = [f for f in KERNEL_FLAGS if f in flags]
    amx = "" if "amx_tile" in flags else " (no AMX)"
    return f"{model}; {' '.join(present) or 'no AVX2/AVX-512'}{amx}"


def native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16). Elsewhere (AVX2-only: AMD
    Zen 2/3, Intel before Cooper Lake) vLLM-CPU converts bf16 for every matmul, and float32 runs faster."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_model_and_flags()[1])


def physical_memory_bytes() -> int:
    """The machine's memory, or this container's cgroup limit where that is lower; 0 when unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not POSIX: no limit known
        return 0
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


@cache
def on_cpu() -> bool:
    """True when vLLM's platform is the CPU (the vllm-cpu build, or no GPU)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "vLLM not installed"
