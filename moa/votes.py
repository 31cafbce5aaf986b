"""Majority vote over normalised answers (self-consistency) — no LLM call.

Exact-answer tasks are where small aggregators do worst; voting on the extracted
answer is the cheap, robust alternative.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Literal

Normalize = Literal["number", "choice", "text"]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_CHOICE = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-E])\)?\b|^\(?([A-E])\)?[.):]?\s*$", re.I | re.M)


def normalize(text: str, how: Normalize) -> str | None:
    """The comparable answer inside `text`, or None when there is none."""
    if how == "number":
        found = _NUMBER.findall(text)
        if not found:
            return None
        value = found[-1].replace(",", "")
        return str(float(value)).removesuffix(".0")
    if how == "choice":
        found = [a or b for a, b in _CHOICE.findall(text)]
        if found:
            return found[-1].upper()
        letters = re.findall(r"\b([A-E])\b", text)
        return letters[-1].upper() if letters else None
    cleaned = text.strip().lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(cleaned.split()) or None


def majority(texts: list[str], how: Normalize) -> tuple[int, Counter]:
    """Index of the first response carrying the most common answer, and the tally (ties: earliest wins)."""
    keys = [normalize(t, how) for t in texts]
    tally = Counter(k for k in keys if k is not None)
    if not tally:
        return 0, tally
    best = max(tally.values())
    for i, key in enumerate(keys):
        if key is not None and tally[key] == best:
            return i, tally
    return 0, tally
