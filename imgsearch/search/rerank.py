"""Re-ranking a candidate list: maximal marginal relevance (diversity).

Room for more re-rankers (e.g. a learned one) working on the candidates :func:`imgsearch.search.ranking.rank`
fetched; each takes relevance scores and the candidates' stored vectors and returns picks in order.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def mmr(relevance: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> np.ndarray:
    """Maximal marginal relevance selection (Carbonell & Goldstein 1998).

    relevance: (C,) relevance of each candidate to the query; vectors: (C, D) unit vectors of the
    candidates (diversity = cosine between them). Returns the indices (into the candidates) of
    ``min(k, C)`` picks in selection order; the first pick is the most relevant (the diversity
    term of an empty selection is 0); ties go to the lower index.
    """
    rel = np.asarray(relevance, dtype=np.float64)
    vec = np.asarray(vectors, dtype=np.float64)
    if rel.ndim != 1 or vec.ndim != 2 or len(rel) != len(vec):
        raise ValueError(
            f"mmr: relevance (C,) and vectors (C, D) expected, got {rel.shape}, {vec.shape}"
        )
    n = min(int(k), len(rel))
    picked: list[int] = []
    available = np.ones(len(rel), dtype=bool)
    max_sim = np.zeros(len(rel), dtype=np.float64)
    for step in range(n):
        value = lam * rel - (1.0 - lam) * max_sim if step else lam * rel
        value = np.where(available, value, -np.inf)
        best = int(np.argmax(value))
        picked.append(best)
        available[best] = False
        sims = vec @ vec[best]
        max_sim = sims if step == 0 else np.maximum(max_sim, sims)
    return np.asarray(picked, dtype=np.int64)
