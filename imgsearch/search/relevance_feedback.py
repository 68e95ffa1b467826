"""Relevance feedback within a session: Rocchio's query update ("more like these, less like those").

Rocchio (1971; Manning, Raghavan & Schütze, *Introduction to Information Retrieval*, 9.1.1)::

    q' = alpha * q + beta * mean(liked) - gamma * mean(disliked)

with the textbook weights ``alpha=1, beta=0.75, gamma=0.15`` as defaults; an empty liked or
disliked set contributes nothing. The result is renormalised to unit length, because the index
compares unit vectors (cosine = inner product). The caller searches the index again with ``q'``
and drops the disliked items from the answer (:func:`imgsearch.search.ranking.rank`'s
``exclude_ids``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.errors import ConfigError
from imgsearch.search.index import ImageIndex


@dataclass(frozen=True)
class RocchioConfig:
    """Weights of the query, the liked mean and the disliked mean (all >= 0)."""

    alpha: float = 1.0
    beta: float = 0.75
    gamma: float = 0.15

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or value < 0:
                raise ConfigError(f"rocchio {name} must be finite and >= 0, got {value}")


def _mean(vectors: np.ndarray | None, dim: int, name: str) -> np.ndarray:
    if vectors is None:
        return np.zeros(dim, dtype=np.float64)
    arr = np.asarray(vectors, dtype=np.float64)
    if arr.size == 0:
        return np.zeros(dim, dtype=np.float64)
    arr = np.atleast_2d(arr)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{name} vectors must be (n, {dim}), got {np.shape(vectors)}")
    return arr.mean(axis=0)


def rocchio(
    query: np.ndarray,
    liked: np.ndarray | None = None,
    disliked: np.ndarray | None = None,
    cfg: RocchioConfig | None = None,
) -> np.ndarray:
    """The moved query, unit length, float32.

    query: (D,) or (M, D) query vectors (each row moved the same way); liked / disliked:
    (n, D) vectors of the results voted up / down (``None`` or empty: no term).
    Raises ValueError on mismatched shapes or when the moved query has zero length (the
    feedback cancelled the query out: nothing to search with).
    """
    cfg = cfg or RocchioConfig()
    q = np.asarray(query, dtype=np.float64)
    single = q.ndim == 1
    q = np.atleast_2d(q)
    if q.ndim != 2:
        raise ValueError(f"query must be (D,) or (M, D), got {np.shape(query)}")
    dim = q.shape[1]
    shift = cfg.beta * _mean(liked, dim, "liked") - cfg.gamma * _mean(disliked, dim, "disliked")
    moved = cfg.alpha * q + shift[None, :]
    norms = np.linalg.norm(moved, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms <= 1e-12):
        raise ValueError("relevance feedback cancelled the query out (zero vector)")
    out = (moved / norms).astype(np.float32)
    return out[0] if single else out


def vectors_of(index: ImageIndex, image_ids: Sequence[str]) -> np.ndarray:
    """The stored (n, D) vectors of gallery images by id; ValueError names unknown ids."""
    if not image_ids:
        return np.zeros((0, index.dim), dtype=np.float32)
    ids = index.meta[schema.IMAGE_ID].astype(str)
    where = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
    wanted = [str(i) for i in image_ids]
    unknown = [i for i in wanted if i not in where.index]
    if unknown:
        raise ValueError(f"image ids not in the index: {unknown[:10]}")
    return np.asarray(index.vectors(where.loc[wanted].to_numpy(dtype=np.int64)), dtype=np.float32)
