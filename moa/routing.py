"""What a `route` step asks of a router, and how it turns predictions into a choice.

A router reads only the query and predicts, per model, the chance that model answers
it correctly (RouteMoA's scorer; RouteLLM's win-rate routers). The one in this project
embeds the query (all-MiniLM-L6-v2) and applies a logistic regression per model, fitted
from `moa eval` results (serving/routing/); `moa/` sees only this protocol, so the core
imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from moa.engine import ChatMessage


class Scorer(Protocol):
    threshold: float  # the min_score the router was fitted to (used where a step sets none)

    async def score(self, conversation: Sequence[ChatMessage], models: Sequence[str]) -> dict[str, float]:
        """Predicted probability of a correct answer, per model, for this conversation."""
        ...


@dataclass(frozen=True, slots=True)
class Choice:
    first: str  # the model asked first
    strongest: str  # the model with the highest predicted success (the escalation target)
    why: str


def choose(scores: Mapping[str, float], models: Sequence[str], min_score: float) -> Choice:
    """The cheapest model predicted to succeed (`models` run cheapest first), else the most likely one.

    Ties go to the cheaper model, as in RouteMoA.
    """
    strongest = max(models, key=lambda m: (scores[m], -models.index(m)))
    shown = ", ".join(f"{m} {scores[m]:.2f}" for m in models)
    for model in models:
        if scores[model] >= min_score:
            return Choice(model, strongest, f"predicted success {shown}; {model} is the cheapest at >= {min_score}")
    return Choice(strongest, strongest, f"predicted success {shown}; none reaches {min_score}: the likeliest, "
                                        f"{strongest}")
