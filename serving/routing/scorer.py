"""A router file as a `moa.routing.Scorer`: embed the query, one logistic regression per model."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from moa.engine import ChatMessage
from serving.routing.embedder import EMBEDDER, embed
from serving.routing.router_file import RouterFile


def query_text(conversation: Sequence[ChatMessage]) -> str:
    """What the router reads: the last user message (RouteMoA's scorer sees only the query)."""
    return next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")


class EmbeddingScorer:
    def __init__(self, router: RouterFile, name: str = "") -> None:
        if router.embedder != EMBEDDER:
            raise ValueError(f"router {name!r} was fitted on {router.embedder!r} embeddings; this build has {EMBEDDER}")
        self.name, self.router, self.threshold = name, router, router.threshold
        self._weights = {m: (np.asarray(r.weights, dtype=np.float32), r.bias) for m, r in router.models.items()}

    def predict(self, embeddings: np.ndarray, models: Sequence[str]) -> dict[str, np.ndarray]:
        """P(correct) per model for each row of `embeddings`."""
        out = {}
        for model in models:
            if model not in self._weights:
                raise KeyError(f"router {self.name!r} has no prediction for model {model!r} "
                               f"(it knows {sorted(self._weights)}); refit it with results for that model")
            w, b = self._weights[model]
            out[model] = 1.0 / (1.0 + np.exp(-(embeddings @ w + b)))
        return out

    async def score(self, conversation: Sequence[ChatMessage], models: Sequence[str]) -> dict[str, float]:
        vector = await asyncio.to_thread(embed, [query_text(conversation)])
        return {m: float(p[0]) for m, p in self.predict(vector, models).items()}
