"""The GPU smoke test's check that each engine's memory is where the plan put it (no GPU needed: the plan and
nvidia-smi's per-process rows are given)."""

from __future__ import annotations

import os
import subprocess
import sys

from serving.placement.check import GpuProcess, engine_of, problems

PLAN = {"gpu": {"engines": {"big": {"cuda_visible_devices": "0,1"}, "small": {"cuda_visible_devices": "2"}}}}
OWNERS = {100: "big", 101: "big", 200: "small", 300: None}


def test_memory_on_the_planned_gpus_passes():
    rows = [GpuProcess(100, "0", 30000), GpuProcess(101, "1", 30000), GpuProcess(200, "2", 9000)]
    assert problems(PLAN, rows, OWNERS.get) == []


def test_an_engine_on_another_gpu_than_planned_fails_naming_it():
    """What CUDA's fastest-first numbering does on a mixed node: `small` was given 2, its memory is on 0."""
    rows = [GpuProcess(100, "0", 30000), GpuProcess(101, "1", 30000), GpuProcess(200, "0", 9000)]
    found = problems(PLAN, rows, OWNERS.get)
    assert any(p.startswith("small: pid 200 holds 9000 MiB on GPU 0, planned ['2']") for p in found), found
    assert any("small: no memory on planned GPU(s) ['2']" in p for p in found), found


def test_a_process_no_engine_owns_and_a_missing_shard_fail():
    rows = [GpuProcess(100, "0", 30000), GpuProcess(200, "2", 9000), GpuProcess(300, "1", 500)]
    found = problems(PLAN, rows, OWNERS.get)
    assert any("pid 300" in p and "no engine's" in p for p in found), found
    assert any("big: no memory on planned GPU(s) ['1']" in p for p in found), found


def test_engine_of_reads_moa_engine_from_a_real_process_environment():
    child = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
                             env={**os.environ, "MOA_ENGINE": "qwen-test"}, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"  # exec'd: /proc shows its own environment, not ours
        assert engine_of(child.pid) == "qwen-test" and engine_of(os.getpid()) == os.environ.get("MOA_ENGINE")
    finally:
        child.kill()
        child.wait()
    assert engine_of(2**22 + 12345) is None  # no such process
