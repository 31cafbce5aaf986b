"""`moa route`: fit a query router from `moa eval` results, and ask one what it predicts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from serving.cli.common import ConfigOption, out, registry, show, user_errors

app = typer.Typer(help="Query routers: predicted success per model from the query alone (RouteMoA-style scorer).",
                  no_args_is_help=True)


def _costs(models: list[str], given: list[str]) -> dict[str, float]:
    costs = dict.fromkeys(models, 1.0)
    for text in given:
        name, sep, value = text.partition("=")
        if not sep or name not in costs:
            raise typer.BadParameter(f"--cost {text!r}: expected MODEL=WEIGHT with MODEL one of {models}")
        try:
            costs[name] = float(value)
        except ValueError:
            raise typer.BadParameter(f"--cost {text!r}: {value!r} is not a number") from None
        if costs[name] <= 0:
            raise typer.BadParameter(f"--cost {text!r}: the weight must be > 0")
    return costs


@app.command("fit")
def fit(
    results: list[Path] = typer.Option(..., "--from", help="results.json of `moa eval` runs with single-model "
                                       "systems (repeatable; later files win)."),
    output: Path = typer.Option(..., "-o", "--output", help="Router file to write (JSON)."),
    tasks_file: list[Path] = typer.Option([], "--tasks", help="The task files the evaluations ran (repeatable; "
                                          "default: those their results name, found beside the built-in set)."),
    cost: list[str] = typer.Option([], "--cost", help="Relative cost of one completion token of a model, "
                                   "MODEL=WEIGHT (repeatable; default 1: cost = tokens). E.g. parameter counts."),
    folds: int = typer.Option(5, "--folds", min=2, help="Cross-validation folds for the held-out figures."),
    c: float = typer.Option(1.0, "--C", min=1e-6, help="Inverse L2 regularisation of the logistic regressions."),
    lam: float = typer.Option(0.1, "--lambda", min=0.0, help="Cost weight of the score: accuracy - lambda x cost "
                              "relative to always asking the strongest model."),
) -> None:
    """Fit a router: embed each task's query (all-MiniLM-L6-v2), one logistic regression per model.

    Reports, on held-out folds, how well each model's success is predicted and how the `route` rule
    (the cheapest model predicted to succeed, else the likeliest) compares with always asking one
    model; writes the router refitted on every task, with the threshold that scored best. Name it
    in models.yaml under `routers:` and use it from a `route` step.
    """
    from serving.bench.datasets import DEFAULT_TASKS, load_tasks
    from serving.routing.embedder import embed
    from serving.routing.fit import fit_router, read_outcomes
    from serving.routing.scorer import query_text

    with user_errors():
        outcomes, named = read_outcomes(results)
        files = tasks_file or [Path(n) if Path(n).exists() else DEFAULT_TASKS.parent / Path(n).name for n in named]
        tasks = {t.id: t for f in files for t in load_tasks(f)}
        missing = [t for t in outcomes.tasks if t not in tasks]
        if missing:
            raise ValueError(f"tasks {missing[:5]} of the results are not in the task file; pass it with --tasks")
        x = embed([query_text(tasks[t].conversation()) for t in outcomes.tasks])
        router = fit_router(x, outcomes, _costs(outcomes.models, cost), folds=folds, c=c, lam=lam,
                            sources=[str(p) for p in results])
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(router.model_dump_json(indent=1) + "\n")
    _report(router.fit)
    out.print(f"wrote {output} (threshold {router.threshold:.2f}); name it under `routers:` in models.yaml")


def _report(fit: dict) -> None:
    table = Table(title=f"held-out success prediction ({fit['folds']}-fold, {fit['tasks']} tasks)",
                  title_justify="left")
    for column in ("model", "base rate", "accuracy", "majority", "AUROC", "Brier", "Brier (base rate)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model, p in fit["prediction"].items():
        table.add_row(model, f"{p['base_rate']:.0%}", f"{p['accuracy']:.0%}", f"{p['majority_accuracy']:.0%}",
                      "–" if p["auroc"] is None else f"{p['auroc']:.2f}", f"{p['brier']:.3f}",
                      f"{p['brier_base_rate']:.3f}")
    show(table)
    table = Table(title=f"routing on held-out predictions (score = accuracy - {fit['lambda']} x relative cost)",
                  title_justify="left")
    for column in ("policy", "accuracy", "cost/task", "relative cost", "score", "first asked"):
        table.add_column(column, justify="left" if column in ("policy", "first asked") else "right")
    best = fit["best"]["policy"]
    for row in [*fit["always"], fit["oracle"], *fit["routed"]]:
        share = ", ".join(f"{m} {s:.0%}" for m, s in row["share"].items() if s)
        name = row["policy"] + (" (best)" if row["policy"] == best else "")
        table.add_row(name, f"{row['accuracy']:.0%}", f"{row['cost_per_task']:.1f}", f"{row['relative_cost']:.2f}",
                      f"{row['score']:.3f}", share)
    show(table)
    verdict = "beats" if fit["beats_strongest"] else "does not beat"
    out.print(f"the best threshold {verdict} always asking {fit['strongest']} on this score")


@app.command("score")
def score(
    router: str = typer.Argument(..., help="A router named under `routers:` in models.yaml."),
    prompt: str = typer.Argument(..., help="The query."),
    config: Path | None = ConfigOption,
) -> None:
    """Show what a router predicts for one query, and which model a `route` step would ask first."""
    import asyncio

    from moa.routing import choose

    reg = registry(config)
    with user_errors():
        scorer = reg.scorer(router)
        models = sorted(scorer.router.models, key=lambda m: scorer.router.models[m].cost)
        scores = asyncio.run(scorer.score([{"role": "user", "content": prompt}], models))
    out.print(choose(scores, models, scorer.threshold).why)
