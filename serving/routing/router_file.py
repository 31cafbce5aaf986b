"""The router file `moa route fit` writes and models.yaml's `routers:` names (JSON, schema-checked)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ModelRouter(BaseModel):
    """P(correct | query) = sigmoid(weights · embedding + bias): a logistic regression on the query embedding."""

    model_config = ConfigDict(extra="forbid")
    weights: list[float]
    bias: float
    cost: float = Field(default=1.0, gt=0)  # relative cost per completion token, as fitted
    train_accuracy: float  # share of training tasks the model answered correctly


class RouterFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embedder: str
    dimensions: int
    threshold: float = Field(ge=0, le=1)  # min_score that scored best on held-out tasks
    models: dict[str, ModelRouter]
    fit: dict = Field(default_factory=dict)  # how it was fitted, held-out figures (reported by moa eval)


def read_router(path: Path) -> RouterFile:
    """The router at `path`; errors name the file and what is wrong."""
    try:
        router = RouterFile.model_validate_json(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the router file ({exc.strerror}); `moa route fit` writes one") from None
    except ValidationError as exc:
        raise ValueError(f"{path}: not a router file: {exc.errors()[0]['msg']} at "
                         f"{'.'.join(map(str, exc.errors()[0]['loc']))}") from None
    bad = [m for m, r in router.models.items() if len(r.weights) != router.dimensions]
    if bad:
        raise ValueError(f"{path}: model(s) {bad} have weights of the wrong length (expected {router.dimensions})")
    return router
