"""`moa eval`: accuracy (95% CI) and cost per correct answer for models and pipelines; pairwise win rates."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Table

from serving.bench.environment import machine
from serving.cli import eval_passk
from serving.cli.common import (
    ConfigOption,
    ProgressBars,
    ensure_local,
    err,
    exit_cleanly_on_sigterm,
    parse_swap,
    quiet_engines,
    registry,
    show,
    user_errors,
)
from serving.placement.machine import engine_version

DEFAULT_SYSTEMS = ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "self-moa"]


def eval_(
    system: list[str] | None = typer.Option(None, "--system", "-s", help="A model or a pipeline, optionally with "
                                            "@before/@after (where synthesis steps put references); with --url, a "
                                            "name the server serves. Repeatable "
                                            f"(default: {', '.join(DEFAULT_SYSTEMS)}; none with --votes alone)."),
    suite_name: str = typer.Option("tasks", "--suite", help="What to evaluate on: tasks (a JSONL task set, see "
                                   "--tasks) or humaneval (164 Python functions to complete, graded by their unit "
                                   "tests in the sandbox; pass@k)."),
    tasks_file: Path | None = typer.Option(None, "--tasks", help="With --suite tasks: JSONL tasks: id, prompt or "
                                           "messages, answer, scorer (exact|numeric|choice|regex) (default: the "
                                           "built-in 50)."),
    url: str | None = typer.Option(None, "--url", help="Evaluate what a running OpenAI-compatible server serves "
                                   "(moa serve, vLLM) instead: no engine starts here; answers are scored here."),
    api_key: str = typer.Option(os.environ.get("MOA_API_KEY", "none"), "--api-key", help="For --url."),
    samples: int = typer.Option(1, "--samples", min=1, help="Answers per item from each single model, in one n=N "
                                "request, for pass@k (k = 1, 5, 10 up to N); a pipeline writes one."),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0, help="Single models' temperature "
                                             "(default: 0, greedy, for one sample; 0.8 for several)."),
    swap: list[str] = typer.Option([], "--swap", help="Replace a model inside pipelines, OLD=NEW (repeatable)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Cap every step's max_tokens "
                                          "(default: the suite's, 256 for tasks and 1024 for humaneval)."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Items (requests) in flight per system."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N items."),
    sample: int | None = typer.Option(None, "--sample", min=1, help="Only N items drawn at random with --seed."),
    ids: list[str] | None = typer.Option(None, "--ids", help="Only these items (e.g. HumanEval/17; repeatable), "
                                         "each seeded as in a run over the whole suite: rerun what a run lost."),
    seed: int = typer.Option(0, "--seed", help="Item i uses seed + 1000*i; --sample draws with it."),
    pairwise: str | None = typer.Option(None, "--pairwise", help="Judge every other system against this one "
                                        "(a --system label), in both orders."),
    votes: Path | None = typer.Option(None, "--votes", help="The playground's votes (JSONL, `moa serve --votes`): "
                                      "human win rates per pair of targets beside the judge's verdicts on the same "
                                      "answers, and how often they agree."),
    judge: str = typer.Option("qwen2.5-coder-1.5b", "--judge", help="Model that judges pairs and votes."),
    output: Path | None = typer.Option(None, "--out", "-o", help="Directory for results.json and summary.md "
                                       "(default: eval-results/<date-time>)."),
    config: Path | None = ConfigOption,
) -> None:
    """Score models and pipelines on a suite: the built-in tasks (accuracy with a 95% confidence interval,
    tokens and seconds per correct answer) or HumanEval (pass@1 with its interval, pass@k with --samples,
    beside published figures); with --url, what a running server serves; with --pairwise, win rates judged by
    a local model in both orders; with --votes, people's verdicts from the playground beside the judge's."""
    from serving.api.votes import read_votes
    from serving.bench.eval_suites import get_suite, subset
    from serving.bench.evaluate import resolve_system

    exit_cleanly_on_sigterm()
    reg = registry(config)
    with user_errors():
        if url is not None and (swap or pairwise or votes):
            raise ValueError("--url evaluates what the server serves as it is: --swap, --pairwise and --votes need "
                             "local engines")
        if url is not None and not system:
            raise ValueError("with --url, name the served models or pipelines to evaluate: -s NAME (repeatable)")
        system = system if system else ([] if votes else DEFAULT_SYSTEMS)
        if votes is not None and not votes.is_file():
            raise ValueError(f"--votes {votes}: no such file (the playground writes it: moa serve --votes PATH)")
        human = read_votes(votes) if votes is not None else []
        if votes is not None and not human:
            raise ValueError(f"--votes {votes}: the file has no votes yet")
        suite = get_suite(suite_name, tasks_file)
        everything = suite.load()
        tasks, chosen = subset(everything, limit=limit, sample=sample, seed=seed)
        positions = None
        if ids:
            if limit or sample or url:
                raise ValueError("--ids reruns items on local engines: not with --limit, --sample or --url")
            where = {t.id: i for i, t in enumerate(everything)}
            if unknown := [i for i in ids if i not in where]:
                raise ValueError(f"--ids: no item {unknown[0]!r} in {suite.name} (ids look like {everything[0].id})")
            positions = sorted(where[i] for i in dict.fromkeys(ids))
            tasks, chosen = [everything[i] for i in positions], f"{len(positions)} of {len(everything)} by id"
        max_tokens = max_tokens or suite.max_tokens
        used_temperature = temperature if temperature is not None else (0.8 if samples > 1 else 0.0)
        if samples > 1 and used_temperature <= 0:
            raise ValueError(f"--samples {samples} needs --temperature above 0 (greedy samples would be identical)")
        systems = []
        if url is None:
            mapping = dict(parse_swap(s) for s in swap)
            for name in mapping.values():
                reg.get(name)
            systems = [resolve_system(reg, text, mapping, max_tokens, samples=samples, temperature=temperature)
                       for text in dict.fromkeys(system)]
            if pairwise is not None and pairwise not in [s.label for s in systems]:
                raise ValueError(f"--pairwise {pairwise!r} must be one of the --system labels: "
                                 f"{', '.join(s.label for s in systems)}")
            judging = pairwise is not None or bool(human)
            if judging:
                reg.get(judge)
            needed = {m for s in systems for m in s.pipeline.models()} | ({judge} if judging else set())
            ensure_local(*(reg.get(name) for name in sorted(needed)))
        scoring = suite.prepare()
        out_dir = output or Path("eval-results") / time.strftime("%Y%m%d-%H%M%S")
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "command": "moa eval " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]),
                "machine": machine(), "engine": f"endpoint {url}" if url else engine_version(),
                "suite": suite.name, "metric": suite.metric, "tasks": suite.describe(), "subset": chosen,
                "items": len(tasks), "ids": [t.id for t in tasks] if ids else None, "samples": samples,
                "temperature": used_temperature, "max_tokens": max_tokens,
                "concurrency": concurrency, "seed": seed, "votes": str(votes) if votes else None, "url": url,
                **scoring}
        quiet = quiet_engines(not os.environ.get("MOA_VERBOSE") and url is None, "eval")
        with quiet as log_path, ProgressBars() as progress:
            try:
                if url is None:
                    data = asyncio.run(_evaluate(reg, suite, systems, tasks, concurrency, seed, pairwise, judge,
                                                 progress, human, positions))
                else:
                    data = asyncio.run(_evaluate_url(url, api_key, suite, list(dict.fromkeys(system)), tasks,
                                                     concurrency, seed, max_tokens, samples, temperature, progress))
            except Exception:
                if log_path:
                    err.print(f"engine log: {log_path}", highlight=False, soft_wrap=True)
                raise
    data["meta"] = meta
    (out_dir / "results.json").write_text(json.dumps(data, indent=1))
    (out_dir / "summary.md").write_text(markdown(data))
    written = [out_dir / "results.json", out_dir / "summary.md"]
    try:
        from serving.bench.pareto import plot

        if data["accuracy"]:
            written.append(plot(data["accuracy"], out_dir / "pareto.png"))
    except ImportError:  # matplotlib is the `bench` extra
        err.print("no pareto.png: pip install 'moa-stack[bench]' for plots", highlight=False)
    for table in tables(data):
        show(table)
    err.print(f"written: {', '.join(map(str, written))}", highlight=False)


def _published(suite, system):
    return suite.published(system.label) if system.single_model else None


def _details(tasks, results) -> dict:
    """Per system, per item: its answer(s), whether the (first) one was right, and each sample's verdict."""
    return {label: [{"task": t.id, "category": t.category, "correct": r.correct.get(t.id),
                     "passed": r.passed.get(t.id), **asdict(sample)}
                    for t, sample in zip(tasks, r.samples, strict=True)] for label, r in results.items()}


async def _evaluate(reg, suite, systems, tasks, concurrency, seed, pairwise, judge, progress, human,
                    positions=None) -> dict:
    from serving.bench.evaluate import accuracy_row, answer_tasks, group_by_models, judge_pairs, routing_rows
    from serving.bench.human_votes import judge_votes
    from serving.engines.pool import EnginePool
    from serving.sandbox import check_sandbox

    results = {}
    checks_sandbox = check_sandbox()  # moa eval turns code execution on for its own run (pipelines with `check`)
    judging = pairwise is not None or bool(human)
    groups = group_by_models(systems)
    if judging:  # the group whose engines include the judge runs last: its pool stays up for the judging
        groups.sort(key=lambda g: judge in g[0].pipeline.models())
    async with AsyncExitStack() as stack:
        judge_pool = None
        for i, group in enumerate(groups):
            models = group[0].pipeline.models()
            keep = judging and i == len(groups) - 1 and judge in models
            async with AsyncExitStack() as this_group:
                # A kept pool closes with the outer stack, after the judging; any other at the end of its group.
                pool = await (stack if keep else this_group).enter_async_context(EnginePool(reg, models))
                judge_pool = pool if keep else None
                for system in group:
                    results[system.label] = await answer_tasks(
                        system, tasks, pool.engines, concurrency=concurrency, seed=seed, prices=reg.prices(),
                        scorers=reg.scorers(), suite=suite, code_runner=checks_sandbox, positions=positions,
                        on_done=progress(f"{system.label} · {len(tasks)} {suite.name}", len(tasks)))
        rows = [accuracy_row(results[s.label], tasks, _published(suite, s)) for s in systems]
        pairs, voted = [], []
        if judging:
            pool = judge_pool or await stack.enter_async_context(EnginePool(reg, [judge]))
            for s in systems if pairwise is not None else []:
                if s.label == pairwise:
                    continue
                progress(f"judging {s.label} against {pairwise} with {judge} (both orders)", 0)
                pairs.append((await judge_pairs(pool[judge], tasks, results[s.label], results[pairwise],
                                                concurrency=concurrency)).row())
            if human:
                progress(f"judging {len(human)} voted pairs with {judge} (both orders)", 0)
                voted = await judge_votes(pool[judge], human, concurrency=concurrency)
    return {"accuracy": rows, "pairwise": pairs, "votes": voted, "routing": routing_rows(reg, systems, results),
            "responses": _details(tasks, results)}


async def _evaluate_url(url, api_key, suite, names, tasks, concurrency, seed, max_tokens, samples, temperature,
                        progress) -> dict:
    from serving.bench.evaluate import accuracy_row
    from serving.bench.evaluate_url import answer_served, client_for, served_systems

    client = client_for(url, api_key)
    try:
        systems = await served_systems(client, url, names, max_tokens=max_tokens, samples=samples,
                                       temperature=temperature)
        results = {}
        for system in systems:
            results[system.label] = await answer_served(
                client, system, tasks, suite, concurrency=concurrency, seed=seed, max_tokens=max_tokens,
                on_done=progress(f"{system.label} · {len(tasks)} {suite.name} · {url}", len(tasks)))
    finally:
        await client.close()
    rows = [accuracy_row(results[s.label], tasks, _published(suite, s)) for s in systems]
    return {"accuracy": rows, "pairwise": [], "votes": [], "routing": [], "responses": _details(tasks, results)}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _correct(row: dict) -> str:
    """31/50; with several samples per task the expected count of one sample, 31.4/50."""
    count = row["correct"]
    return f"{count if isinstance(count, int) else f'{count:.1f}'}/{row['tasks']}"


def _accuracy_cells(row: dict, categories: list[str]) -> list[str]:
    low, high = row["ci95"]
    return [row["system"], ", ".join(row["models"]), _correct(row),
            f"{_pct(row['accuracy'])} [{_pct(low)}–{_pct(high)}]",
            *(_pct(row["by_category"].get(c)) for c in categories), _num(row["engine_calls_per_task"], 1),
            _num(row["completion_tokens_per_task"]), _num(row["completion_tokens_per_correct"]),
            _num(row["seconds_per_correct"], 2)]


def _pair_cells(row: dict) -> list[str]:
    low, high = row["ci95"]
    return [row["system"], row["reference"], f"{_pct(row['win_rate'])} [{_pct(low)}–{_pct(high)}]",
            f"{row['wins']}/{row['ties']}/{row['losses']}", _pct(row["order_consistency"]),
            _pct(row["first_position_rate"]), row["judge"]]


def _headers(data: dict) -> tuple[list[str], list[str]]:
    categories = list(dict.fromkeys(c for row in data["accuracy"] for c in row["by_category"]))
    return categories, ["system", "models", "correct", "accuracy [95% CI]", *categories, "calls/task",
                        "compl. tok/task", "compl. tok/correct", "s/correct"]


PAIR_HEADERS = ["system", "against", "win rate [95% CI]", "W/T/L", "order-consistent", "chose first shown", "judge"]


def _ci(value: float | None, low: float | None, high: float | None) -> str:
    """62% [48–74%]: the short form of a rate and its 95% interval, for the terminal."""
    return "–" if value is None else f"{_pct(value)} [{_num(low and 100 * low)}–{_pct(high)}]"


def _pass_at_k(data: dict) -> bool:
    return data.get("meta", {}).get("metric") == "pass@k"


def tables(data: dict) -> list[Table]:
    """The terminal's view, readable at 80 columns: accuracy and cost per correct answer, accuracy by
    category, pairwise win rates. summary.md and results.json have every column."""
    rows = data["accuracy"]
    accuracy = Table(title="accuracy and cost per correct answer", title_justify="left", caption_justify="left")
    accuracy.add_column("system", no_wrap=True)
    for header in ("correct", "accuracy\n[95% CI]", "tokens per\ncorrect", "seconds per\ncorrect"):
        accuracy.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        accuracy.add_row(row["system"], _correct(row), _ci(row["accuracy"], *row["ci95"]),
                         _num(row["completion_tokens_per_correct"]), _num(row["seconds_per_correct"], 2))
    # Which models stand behind a pipeline (or a swap) — a model's own row needs no note.
    accuracy.caption = "\n".join(f"{row['system']}: {', '.join(row['models'])}" for row in rows
                                  if row["models"] != [row["system"]]) or None
    shown = [accuracy] if any(row["tasks"] for row in rows) else []  # open prompts only: no accuracy to show
    if _pass_at_k(data):
        shown = [eval_passk.table(data)]
    categories = list(dict.fromkeys(c for row in rows for c in row["by_category"]))
    if len(categories) > 1:
        by_category = Table(title="accuracy by category", title_justify="left")
        by_category.add_column("system", no_wrap=True)
        for category in categories:
            by_category.add_column(category, justify="right", overflow="fold")
        for row in rows:
            by_category.add_row(row["system"], *(_pct(row["by_category"].get(c)) for c in categories))
        shown.append(by_category)
    if data["pairwise"]:
        first = data["pairwise"][0]  # one reference and one judge for every pair
        pair = Table(title=f"pairwise against {first['reference']}, judged by {first['judge']} in both orders "
                           "(a split verdict is a tie)", title_justify="left")
        pair.add_column("system", no_wrap=True)
        for header in ("win rate\n[95% CI]", "W/T/L", "order\nconsistent", "chose first\nshown"):
            pair.add_column(header, justify="right", no_wrap=True)
        for row in data["pairwise"]:
            pair.add_row(row["system"], _ci(row["win_rate"], *row["ci95"]),
                         f"{row['wins']}/{row['ties']}/{row['losses']}", _pct(row["order_consistency"]),
                         _pct(row["first_position_rate"]))
        shown.append(pair)
    if data.get("votes"):
        table = Table(title=f"people's votes (playground) beside {data['votes'][0]['judge']}'s verdicts on the same "
                            "answers, both orders; win rate of the first-named target", title_justify="left")
        for header in ("pair", "votes", "people", "judge", "agree", "agree where\npeople chose"):
            table.add_column(header, justify="left" if header == "pair" else "right", no_wrap=header != "pair")
        for row in data["votes"]:
            table.add_row(" vs ".join(p for p in row["pair"] if p), str(row["votes"]), _pct(row["human_win_rate"]),
                          _pct(row["judge_win_rate"]), _pct(row["agreement"]), _pct(row["agreement_decisive"]))
        shown.append(table)
    return shown


def markdown(data: dict) -> str:
    meta = data.get("meta", {})
    categories, headers = _headers(data)
    lines = [f"# moa eval — {meta.get('date', '')}", "", f"Command: `{meta.get('command', '')}`", "",
             f"Machine: {meta.get('machine', '')}; {meta.get('engine', '')}. Tasks: {meta.get('tasks')}; "
             f"max_tokens {meta.get('max_tokens')}; {meta.get('concurrency')} tasks in flight; "
             f"seed {meta.get('seed')}.",
             ]
    if meta.get("suite", "tasks") != "tasks" or meta.get("subset") or meta.get("url"):
        lines += ["", f"Suite: {meta.get('suite')}" + (f" ({meta['subset']})" if meta.get("subset") else "")
                  + (f"; {meta['samples']} samples per item from single models at temperature {meta['temperature']}"
                     if meta.get("samples", 1) > 1 else "")
                  + (f"; sandbox: {meta['sandbox']}" if meta.get("sandbox") else "")
                  + (f"; systems served by {meta['url']}" if meta.get("url") else "") + "."]
    if data["accuracy"] and _pass_at_k(data):
        lines += ["", *eval_passk.markdown(data)]
    elif data["accuracy"]:
        lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(_accuracy_cells(row, categories)) + " |" for row in data["accuracy"]]
        lines += ["", "s/correct: the system's wall time over the task set divided by its correct answers "
                  "(tasks run concurrently; each system had the machine to itself)."]
    for row in data.get("routing", []):
        best = row["held_out_best"] or {}
        lines += ["", f"Routing ({row['system']}, router `{row['router']}`): first asked "
                  + ", ".join(f"{m} {_pct(share)}" for m, share in row["first_asked"].items())
                  + f"; escalated on {_pct(row['escalated'])} of tasks. The router's held-out fit "
                  f"({row['fit_tasks']} tasks): AUROC "
                  + ", ".join(f"{m} {_num(a, 2)}" for m, a in row["held_out_auroc"].items())
                  + f"; its best rule alone {_pct(best.get('accuracy'))} at {_num(best.get('relative_cost'), 2)}x "
                  f"the strongest model's cost ({'beats' if row['beats_strongest'] else 'does not beat'} it on "
                  "the cost-weighted score)."]
    if data["pairwise"]:
        lines += ["", "| " + " | ".join(PAIR_HEADERS) + " |", "|" + "---|" * len(PAIR_HEADERS)]
        lines += ["| " + " | ".join(_pair_cells(row)) + " |" for row in data["pairwise"]]
    if data.get("votes"):
        lines += ["", f"People's votes from the playground ({meta.get('votes')}) beside {data['votes'][0]['judge']}'s "
                  "verdicts on the same answers (both orders); win rates of the first-named target, a tie or "
                  "\"both bad\" counting half.", "",
                  "| pair | votes | people | judge | agreement | agreement where people chose | ties | both bad |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {' vs '.join(p for p in r['pair'] if p)} | {r['votes']} | {_pct(r['human_win_rate'])} | "
                  f"{_pct(r['judge_win_rate'])} | {_pct(r['agreement'])} | {_pct(r['agreement_decisive'])} | "
                  f"{r['ties']} | {r['both_bad']} |" for r in data["votes"]]
    return "\n".join(lines) + "\n"
