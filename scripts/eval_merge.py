"""Replace the items a `moa eval` run lost with their rerun (`moa eval --ids`), and recompute the table.

    python scripts/eval_merge.py RUN/results.json RERUN/results.json -o MERGED_DIR [--not-counted-s S]

A run loses items when an engine dies under them (they come back as errors, scored wrong). `--ids` reruns just
those, each seeded as in the whole run, so the merged file is what one uninterrupted run would have drawn.
Per system: pass@1 with its 95% Wilson interval, errors, tokens per problem, and seconds per problem as
(the run's wall clock - S + the rerun's wall clock) / problems, S being time the run stood still (a pause).
The merged results.json says what was merged in `meta.merged`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def merge(run: dict, rerun: dict, not_counted_s: float) -> dict:
    from serving.bench.stats import wilson_interval

    merged = json.loads(json.dumps(run))
    rows = {r["system"]: r for r in merged["accuracy"]}
    redone = {r["system"]: r for r in rerun["accuracy"]}
    for label, records in rerun["responses"].items():
        fresh = {r["task"]: r for r in records}
        mine = merged["responses"][label]
        replaced = [r["task"] for r in mine if r["task"] in fresh]
        merged["responses"][label] = [fresh.get(r["task"], r) for r in mine]
        rows[label].update(_row(merged["responses"][label], rows[label], redone[label], not_counted_s,
                                wilson_interval))
        rows[label]["rerun"] = replaced
    merged["meta"]["merged"] = {"rerun_command": rerun["meta"].get("command"), "rerun_ids": rerun["meta"].get("ids"),
                                "not_counted_s": not_counted_s}
    return merged


def _row(records: list[dict], row: dict, rerun_row: dict, not_counted_s: float, wilson) -> dict:
    ok = [r for r in records if r.get("error") is None]
    correct = sum(bool(r["correct"]) for r in records)
    low, high = wilson(correct, len(records))
    wall = row["wall_s"] - not_counted_s + rerun_row["wall_s"]
    return {"correct": correct, "accuracy": correct / len(records), "ci95": [low, high],
            "by_category": {"humaneval": correct / len(records)}, "samples_passed": correct,
            "pass_at": {"1": correct / len(records)}, "errors": len(records) - len(ok),
            "engine_calls_per_task": mean(r["engine_calls"] for r in ok),
            "completion_tokens_per_task": mean(r["completion_tokens"] for r in ok),
            "prompt_tokens_per_task": mean(r["prompt_tokens"] for r in ok),
            "completion_tokens_per_correct": sum(r["completion_tokens"] for r in ok if r["correct"]) / correct
            if correct else None,
            "wall_s": wall, "seconds_per_task": wall / len(records),
            "seconds_per_correct": wall / correct if correct else None}


def main() -> None:
    from serving.cli.eval import markdown

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("rerun", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--not-counted-s", type=float, default=0.0,
                        help="seconds the run stood still (paused), taken off its wall clock")
    args = parser.parse_args()
    merged = merge(json.loads(args.run.read_text()), json.loads(args.rerun.read_text()), args.not_counted_s)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(merged, indent=1))
    (args.out / "summary.md").write_text(markdown(merged))
    for row in merged["accuracy"]:
        print(f"{row['system']}: {row['correct']}/{row['tasks']}, {row['errors']} errors, "
              f"{row['completion_tokens_per_task']:.0f} tokens and {row['seconds_per_task']:.1f} s per problem; "
              f"rerun {len(row.get('rerun', []))}")


if __name__ == "__main__":
    main()
