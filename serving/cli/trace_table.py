"""A pipeline trace as a rich table: one row per engine call; errors and step notes below it."""

from __future__ import annotations

from rich.table import Table

from moa.trace import Trace


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def trace_table(trace: Trace) -> Table:
    """One call per line in about 80 columns: layer and step share a column, as do start and end, and the
    three token counts; errors and notes go below the table, where a long message needs no narrow column.
    The cost column shows only where models.yaml prices a model. `moa run --json` has every field.
    """
    usage = trace.usage()
    priced = usage.cost_usd > 0
    table = Table(title=f"trace: {trace.pipeline} ({_s(trace.total_s)} s)", title_justify="left")
    table.add_column("step", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("start–end s", justify="right", no_wrap=True)
    table.add_column("ttft s", justify="right", no_wrap=True)
    table.add_column("tokens in (cached) / out", justify="right")
    if priced:
        table.add_column("cost $", justify="right", no_wrap=True)
    notes = []
    for c in trace.calls:
        colour = {"ok": "green", "aborted": "yellow"}.get(c.status, "red")
        model = c.model + (f" ×{c.n}" if c.n > 1 else "")  # n samples drawn in one request
        table.add_row(f"{c.layer} {c.step}", model, f"[{colour}]{c.status}[/{colour}]",
                      f"{_s(c.start_s)}–{_s(c.end_s)}", _s(c.ttft_s),
                      f"{c.prompt_tokens} ({c.cached_prompt_tokens}) / {c.completion_tokens}",
                      *([f"{c.cost_usd:.6f}"] if priced else []))
        if c.error or c.note:
            notes.append(f"layer {c.layer} {c.step}, {c.model}: {c.error or c.note}")
    table.add_section()
    table.add_row("total", f"{usage.engine_calls} calls", "", _s(trace.total_s), "",
                  f"{usage.prompt_tokens} ({usage.cached_prompt_tokens}) / {usage.completion_tokens}",
                  *([f"{usage.cost_usd:.6f}"] if priced else []))
    notes += [f"layer {s.layer} {s.step}: {note}" for s in trace.steps for note in s.notes]
    if notes:
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
    return table
