"""`moa eval`'s table for a pass@k suite (HumanEval): pass@1 with its 95% interval, pass@k from several samples,
the published pass@1 beside it, and tokens and seconds per problem. The `tasks` suite's table is in eval.py."""

from __future__ import annotations

from rich.table import Table


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ks(rows: list[dict]) -> list[str]:
    """The k of pass@k beyond 1 that some row has (only systems with that many samples)."""
    return sorted({k for row in rows for k in row.get("pass_at", {}) if k != "1"}, key=int)


def _passed(row: dict) -> str:
    return f"{row['samples_passed']}/{row['tasks'] * row['samples']}"


def _pass1(row: dict) -> str:
    low, high = row["ci95"]
    return f"{_pct(row['accuracy'])} [{_pct(low)}–{_pct(high)}]"


def _published(row: dict) -> str:
    return _pct((row.get("published") or {}).get("pass@1"))


def table(data: dict) -> Table:
    """Fits 80 columns: percentages without the sign, models and sources in the caption."""
    rows, meta = data["accuracy"], data.get("meta", {})
    more = ks(rows)
    shown = Table(title=f"{meta.get('suite', '')} pass@k (%)", title_justify="left", caption_justify="left")
    shown.add_column("system", no_wrap=True)
    headers = ([] if more else ["passed"]) + ["pass@1\n[95% CI]", *(f"pass@{k}" for k in more), "pub.\npass@1",
                                               "tokens/\nproblem", "s/\nproblem"]
    for header in headers:
        shown.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        shown.add_row(row["system"], *([] if more else [_passed(row)]), _pass1(row),
                      *(_pct(row["pass_at"].get(k)) for k in more), _published(row),
                      _num(row["completion_tokens_per_task"]), _num(row["seconds_per_task"], 2))
    notes = [f"{row['system']}: {', '.join(row['models'])}" for row in rows if row["models"] != [row["system"]]]
    sources = dict.fromkeys(row["published"]["source"] for row in rows if row.get("published"))
    notes += [f"pub.: {source}" for source in sources]
    if more:
        notes.append(f"pass@k from {max(row['samples'] for row in rows)} samples per problem at temperature "
                     f"{meta.get('temperature')}; a pipeline writes one answer (pass@1 only)")
    shown.caption = "\n".join(notes) or None
    return shown


HEADERS = ["system", "models", "samples", "passed", "pass@1 [95% CI]", "published pass@1", "compl. tok/problem",
           "s/problem", "s/correct"]


def markdown(data: dict) -> list[str]:
    rows = data["accuracy"]
    more = ks(rows)
    headers = [*HEADERS[:5], *(f"pass@{k}" for k in more), *HEADERS[5:]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        low, high = row["ci95"]
        cells = [row["system"], ", ".join(row["models"]), str(row["samples"]), _passed(row),
                 f"{_pct(row['accuracy'])}% [{_pct(low)}–{_pct(high)}%]",
                 *(_percent(row["pass_at"].get(k)) for k in more), _percent((row.get("published") or {}).get("pass@1")),
                 _num(row["completion_tokens_per_task"]), _num(row["seconds_per_task"], 2),
                 _num(row["seconds_per_correct"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    sources = dict.fromkeys(row["published"]["source"] for row in rows if row.get("published"))
    lines += ["", "pass@1: the mean share of passing samples per problem, with a 95% Wilson interval over the "
              "problems; pass@k: the unbiased estimator of Chen et al. (2021) from the samples. Tokens: all samples "
              "of a problem. s/problem: the system's wall time over the problems (answered concurrently), scoring "
              "excluded." + "".join(f" Published: {s}." for s in sources)]
    return lines
