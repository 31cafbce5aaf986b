"""A pipeline trace as a rich table: one row per engine call, then one per step note."""

from __future__ import annotations

from rich.table import Table

from moa.trace import Trace


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def trace_table(trace: Trace) -> Table:
    table = Table(title=f"trace: {trace.pipeline} ({_s(trace.total_s)} s)", title_justify="left")
    for column in ("layer", "step", "model", "n", "status", "start s", "ttft s", "end s",
                   "prompt", "cached", "completion", "cost $", "error / note"):
        table.add_column(column, overflow="fold")
    for c in trace.calls:
        colour = {"ok": "green", "aborted": "yellow"}.get(c.status, "red")
        table.add_row(str(c.layer), c.step, c.model, str(c.n), f"[{colour}]{c.status}[/{colour}]",
                      _s(c.start_s), _s(c.ttft_s), _s(c.end_s), str(c.prompt_tokens), str(c.cached_prompt_tokens),
                      str(c.completion_tokens), f"{c.cost_usd:.6f}", c.error or c.note or "")
    usage = trace.usage()
    table.add_section()
    table.add_row("", "total", "", "", "", "", "", _s(trace.total_s), str(usage.prompt_tokens),
                  str(usage.cached_prompt_tokens), str(usage.completion_tokens), f"{usage.cost_usd:.6f}", "")
    notes = [f"layer {s.layer} {s.step}: {note}" for s in trace.steps for note in s.notes]
    if notes:
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
    return table
