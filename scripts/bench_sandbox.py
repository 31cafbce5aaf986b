"""What one sandboxed execution costs: `print(1)` (the fixed cost: bwrap's namespaces against rlimits only and
the bare interpreter), and HumanEval's 164 canonical solutions scored as `moa eval` scores an answer (the
problem's tests in the sandbox), one at a time and with the sandbox's default concurrency.

    .venv/bin/python scripts/bench_sandbox.py [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving import sandbox  # noqa: E402
from serving.bench.eval_suites.humaneval import HumanEval  # noqa: E402
from serving.placement.machine import cpu_summary  # noqa: E402


async def score_all(suite: HumanEval, concurrency: int) -> dict:
    problems = suite.load()
    semaphore = asyncio.Semaphore(concurrency)
    seconds: list[float] = []

    async def one(problem) -> bool:
        async with semaphore:
            t = time.perf_counter()
            ok = await suite.score(problem, f"```python\n{problem.prompt}{problem.canonical_solution}```")
            seconds.append(time.perf_counter() - t)
            return ok

    started = time.perf_counter()
    passed = await asyncio.gather(*(one(p) for p in problems))
    wall = time.perf_counter() - started
    seconds.sort()
    return {"concurrency": concurrency, "programs": len(problems), "passed": sum(passed), "wall_s": round(wall, 2),
            "ms_median": round(statistics.median(seconds) * 1000, 1),
            "ms_p90": round(seconds[int(0.9 * (len(seconds) - 1))] * 1000, 1),
            "programs_per_s": round(len(problems) / wall, 2)}


async def main() -> dict:
    report = {"cpu": cpu_summary(), "isolation": sandbox.available(),
              "print(1) median of 20, ms": {k: round(v, 1) for k, v in (await sandbox._costs()).items()}}
    suite = HumanEval()
    report["humaneval canonical solutions"] = [await score_all(suite, 1),
                                               await score_all(suite, suite.runner()._max_concurrent)]
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    result = asyncio.run(main())
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
