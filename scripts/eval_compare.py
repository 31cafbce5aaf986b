"""Put `moa eval` results side by side: one table row per system, and per problem what a system changed
against a baseline (fixed, broken), how often it escalated (made more than one engine call), and where the
question carried no examples a check step could run.

    python scripts/eval_compare.py BASELINE_LABEL results.json [results.json ...]

Each results.json is a `moa eval -o DIR` output; systems run in separate commands (one engine start each)
are compared on the items they share.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(paths: list[str]) -> tuple[dict[str, dict], dict[str, dict[str, dict]], list[dict]]:
    rows, items, metas = {}, {}, []
    for path in paths:
        data = json.loads(Path(path).read_text())
        metas.append(data.get("meta", {}))
        for row in data["accuracy"]:
            rows[row["system"]] = row
        for label, records in data["responses"].items():
            items[label] = {r["task"]: r for r in records}
    return rows, items, metas


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| system | passed | pass@1 [95% CI] | published pass@1 | completion tokens / problem | s / problem |",
             "|---|---|---|---|---|---|"]
    for label, row in rows.items():
        low, high = row["ci95"]
        published = (row.get("published") or {}).get("pass@1")
        lines.append(f"| {label} | {row['correct']}/{row['tasks']} | {pct(row['accuracy'])} [{pct(low)}–{pct(high)}] "
                     f"| {pct(published)} "
                     f"| {row['completion_tokens_per_task']:.0f} | {row['seconds_per_task']:.1f} |")
    return lines


def changes(baseline: dict[str, dict], other: dict[str, dict]) -> dict[str, list[str]]:
    shared = [t for t in baseline if t in other]
    return {
        "fixed": [t for t in shared if not baseline[t]["correct"] and other[t]["correct"]],
        "broken": [t for t in shared if baseline[t]["correct"] and not other[t]["correct"]],
        "escalated": [t for t in shared if other[t]["engine_calls"] > 1],
        "no examples": [t for t in shared if any(n.startswith("no checks") for n in other[t].get("notes", []))],
        "shared": shared,
    }


def main(argv: list[str]) -> None:
    baseline_label, paths = argv[0], argv[1:]
    rows, items, _ = load(paths)
    print("\n".join(table(rows)))
    base = items[baseline_label]
    for label, records in items.items():
        if label == baseline_label:
            continue
        c = changes(base, records)
        print(f"\n{label} against {baseline_label} on {len(c['shared'])} shared problems: escalated on "
              f"{len(c['escalated'])}; fixed {len(c['fixed'])} of the baseline's "
              f"{sum(not base[t]['correct'] for t in c['shared'])} failures ({', '.join(c['fixed']) or 'none'}); "
              f"broke {len(c['broken'])} ({', '.join(c['broken']) or 'none'}); "
              f"{len(c['no examples'])} problems had no example a check could run.")


if __name__ == "__main__":
    main(sys.argv[1:])
