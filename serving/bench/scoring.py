"""Scorers for `moa eval`: is a free-text response right, given the task's reference answer?

Each scorer first finds the response's *final* answer (models explain before they
answer), so a correct number mentioned along the way does not count as correct.
"""

from __future__ import annotations

import re
import string

from moa import votes
from serving.bench.datasets import Task

_ANSWER_MARK = re.compile(r"(?:final answer|answer)\s*(?:is|:)?\s*[:\-]?\s*", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower case, no punctuation, articles or extra spaces (SQuAD-style)."""
    text = text.lower().replace("**", "")
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_spans(response: str) -> list[str]:
    """Where a final answer may sit, most explicit first: \\boxed{}, after "answer is", last line, all."""
    spans = [m.group(1) for m in _BOXED.finditer(response)][-1:]
    marks = list(_ANSWER_MARK.finditer(response))
    if marks:
        spans.append(response[marks[-1].end():].strip().splitlines()[0] if response[marks[-1].end():].strip()
                     else "")
    lines = [line for line in response.strip().splitlines() if line.strip()]
    if lines:
        spans.append(lines[-1])
    spans.append(response)
    return [s for s in spans if s.strip()]


def score_exact(response: str, reference: str) -> bool:
    ref = normalize(reference)
    return any(normalize(span) == ref for span in answer_spans(response))


def _number(text: str) -> float | None:
    """The last number in `text`, extracted as majority-vote does (moa/votes.py), so both agree."""
    value = votes.normalize(text, "number")
    return None if value is None else float(value)


def score_numeric(response: str, reference: str, tolerance: float = 1e-6) -> bool:
    """The number in the most explicit answer span (its last number) equals the reference."""
    target = float(reference.replace(",", ""))
    for span in answer_spans(response):
        value = _number(span)
        if value is not None:
            return abs(value - target) <= max(tolerance, abs(target) * 1e-9)
    return False


def chosen_letter(response: str, letters: str, choices: list[str] | None = None) -> str | None:
    """The option a response picks: "(B)", "B)", "B.", "option B", "**B**" or a lone "B" in its answer spans,
    else the one option whose text it names. A sentence's leading "A" is not a choice."""
    marked = re.compile(
        rf"\(([{letters}])\)|\b([{letters}])[).:](?=\s|$)|\b(?:option|choice)\s+([{letters}])\b|\*\*([{letters}])\b"
        rf"|^\s*([{letters}])\s*$|\b([{letters}])\s*$", re.MULTILINE)
    spans = answer_spans(response)
    for span in spans[:-1]:  # explicit spans only: the whole response lists every option
        hits = [next(g for g in m.groups() if g) for m in marked.finditer(span)]
        if hits:
            return hits[-1]
    if choices:
        for span in spans:
            named = [letters[i] for i, c in enumerate(choices) if normalize(c) and normalize(c) in normalize(span)]
            if len(named) == 1:
                return named[0]
    return None


def score_choice(response: str, reference: str, choices: list[str] | None = None) -> bool:
    letters = "ABCDEFGHIJ"[:len(choices)] if choices else "ABCDEFGHIJ"
    return chosen_letter(response, letters, choices) == reference.strip().upper()


def score_regex(response: str, pattern: str) -> bool:
    return re.search(pattern, response, re.IGNORECASE | re.MULTILINE) is not None


def score(task: Task, response: str) -> bool:
    if task.scorer == "exact":
        return score_exact(response, task.answer)
    if task.scorer == "numeric":
        return score_numeric(response, task.answer, task.tolerance)
    if task.scorer == "choice":
        return score_choice(response, task.answer, task.choices)
    return score_regex(response, task.answer)
