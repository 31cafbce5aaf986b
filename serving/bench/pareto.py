"""Cost against quality: accuracy vs completion tokens per task for every system evaluated, and the Pareto front.

`moa eval` draws pareto.png for the systems of its run; to put several runs on one plot:

    .venv/bin/python -m serving.bench.pareto docs/results/eval-*/results.json -o pareto.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def pareto_front(rows: Sequence[dict]) -> list[dict]:
    """The systems no other system beats on both counts (at least as accurate for fewer or as many tokens)."""
    scored = [r for r in rows if r.get("accuracy") is not None and r.get("completion_tokens_per_task")]

    def dominated(r: dict) -> bool:
        return any(o is not r and o["accuracy"] >= r["accuracy"]
                   and o["completion_tokens_per_task"] <= r["completion_tokens_per_task"]
                   and (o["accuracy"] > r["accuracy"]
                        or o["completion_tokens_per_task"] < r["completion_tokens_per_task"]) for o in scored)

    return sorted((r for r in scored if not dominated(r)), key=lambda r: r["completion_tokens_per_task"])


def label(row: dict) -> str:
    """The system, and the models it ran on where the name does not say (a pipeline run with --swap)."""
    models = row.get("models") or []
    return row["system"] if models == [row["system"]] else f"{row['system']} ({', '.join(models)})"


def plot(rows: Sequence[dict], path: Path, title: str = "accuracy vs completion tokens per task") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get("accuracy") is not None and r.get("completion_tokens_per_task")]
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in scored:
        low, high = r["ci95"]
        ax.errorbar(r["completion_tokens_per_task"], r["accuracy"],
                    yerr=[[r["accuracy"] - low], [high - r["accuracy"]]], fmt="o", capsize=3, alpha=0.8)
        ax.annotate(label(r), (r["completion_tokens_per_task"], r["accuracy"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    front = pareto_front(scored)
    ax.plot([r["completion_tokens_per_task"] for r in front], [r["accuracy"] for r in front], "k--", lw=1,
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("completion tokens per task (log)")
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="moa eval results.json files")
    parser.add_argument("-o", "--out", type=Path, default=Path("pareto.png"))
    args = parser.parse_args(argv)
    rows: dict[str, dict] = {}
    for path in args.results:  # a system measured on the same models in several runs: the later file wins
        for row in json.loads(path.read_text())["accuracy"]:
            rows[label(row)] = row
    print(plot(list(rows.values()), args.out))
    for r in pareto_front(list(rows.values())):
        print(f"  front: {label(r)}: {r['accuracy']:.0%} at {r['completion_tokens_per_task']:.0f} tokens/task")


if __name__ == "__main__":
    main()
