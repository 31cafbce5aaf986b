"""The `moa` command line: one small module per command.

The top layer: may import every other serving package; nothing imports it."""

from __future__ import annotations

import logging
import os

import typer

from serving.cli import bench, eval, models, plan, route, run, serve

app = typer.Typer(
    name="moa",
    help="moa-stack: local Mixture-of-Agents inference on vLLM engines (no external API).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(models.app, name="models")
app.add_typer(route.app, name="route")
app.command("run")(run.run)
app.command("serve")(serve.serve)
app.command("plan")(plan.plan)
app.command("bench")(bench.bench)
app.command("eval")(eval.eval_)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show engine logs on the terminal.")) -> None:
    # vLLM reads its log level at import time: set it before any engine module loads.
    os.environ["MOA_VERBOSE"] = "1" if verbose else ""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep stdout for answers
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    app()
