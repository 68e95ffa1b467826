"""Novelty: are the new images near things the reference knows, or far from all of it?

A drift score says *that* the new data differs; it does not say how. A new drawing style of
emoji we know and a set of unrelated clip art can both score far beyond the threshold. What tells
them apart is where each new image lands: next to some reference image (a shift among things we
know) or far from every one (a new domain).

:func:`nn_novelty` measures it with nearest neighbours (exact, FAISS ``IndexFlatL2``) on
L2-normalised embeddings, so a distance ``d`` is ``sqrt(2 - 2 cos)``:

- the reference's own scale: each reference row's distance to its nearest *other* reference row
  (leave-one-out); ``threshold`` is their ``quantile`` (0.99: 1% of reference rows are that
  isolated from the rest of the reference);
- ``novel_share``: the share of current rows whose nearest reference row is farther than
  ``threshold``;
- ``distance_ratio``: median nearest-reference distance of the current rows over the reference's
  median leave-one-out distance (about 1 when the new rows sit among the reference like its own
  rows do; the larger, the farther away).

For speed the reference is a seeded random subsample of at most ``max_reference`` rows; the
current rows are measured against that same subsample, so both sides see a reference of the same
density. :func:`drift_kind` turns the verdict and ``novel_share`` into ``none`` / ``shift`` /
``novel``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from imgsearch.errors import ConfigError

KINDS = ("none", "shift", "novel")


@dataclass
class Novelty:
    """The outcome of :func:`nn_novelty` (distances are Euclidean on unit vectors)."""

    novel_share: float
    distance_ratio: float
    threshold: float
    reference_median: float
    current_median: float
    quantile: float
    n_reference: int  # reference rows used (after subsampling)
    n_current: int
    seconds: float
    current_distances: np.ndarray = field(repr=False)

    def metrics(self) -> dict[str, float]:
        return {
            "knn_novel_share": self.novel_share,
            "knn_distance_ratio": self.distance_ratio,
            "knn_threshold": self.threshold,
            "knn_reference_median": self.reference_median,
            "knn_current_median": self.current_median,
            "knn_n_reference": float(self.n_reference),
            "knn_seconds": self.seconds,
        }


def _unit(name: str, x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"{name} must be a 2-D array with at least 1 row, got {arr.shape}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return np.ascontiguousarray(arr / np.maximum(norms, 1e-12), dtype=np.float32)


def _loo_distances(ref: np.ndarray, index: faiss.Index) -> np.ndarray:
    """Each row's distance to its nearest other row (a duplicate counts: distance 0)."""
    d2, ids = index.search(ref, 2)
    own = ids[:, 0] == np.arange(ref.shape[0])
    # the row itself is normally first; with an exact duplicate FAISS may list the duplicate first
    nearest = np.where(own, d2[:, 1], d2[:, 0])
    return np.sqrt(np.maximum(nearest, 0.0))


def nn_novelty(
    reference: np.ndarray,
    current: np.ndarray,
    quantile: float = 0.99,
    max_reference: int | None = 5000,
    seed: int = 0,
) -> Novelty:
    """Nearest-neighbour novelty of ``current`` (M, D) against ``reference`` (N, D); see the module.

    Rows are L2-normalised first. ``max_reference`` caps the reference rows used (seeded random
    subsample; ``None`` = all). Raises ``ValueError`` for fewer than 2 reference rows, no current
    rows, or a dimension mismatch, and :class:`ConfigError` for a quantile outside (0, 1].
    """
    if not 0.0 < quantile <= 1.0:
        raise ConfigError(f"novelty quantile must be in (0, 1], not {quantile}")
    if max_reference is not None and max_reference < 2:
        raise ConfigError(f"novelty max_reference must be >= 2 or None, not {max_reference}")
    t0 = time.perf_counter()
    ref = _unit("reference", reference)
    cur = _unit("current", current)
    if ref.shape[0] < 2:
        raise ValueError("the reference needs at least 2 rows for leave-one-out distances")
    if ref.shape[1] != cur.shape[1]:
        raise ValueError(f"dimension mismatch: reference {ref.shape[1]}, current {cur.shape[1]}")
    if max_reference is not None and ref.shape[0] > max_reference:
        rng = np.random.default_rng(seed)
        ref = ref[np.sort(rng.choice(ref.shape[0], max_reference, replace=False))]
    index = faiss.IndexFlatL2(ref.shape[1])
    index.add(ref)
    ref_d = _loo_distances(ref, index)
    cur_d2, _ = index.search(cur, 1)
    cur_d = np.sqrt(np.maximum(cur_d2[:, 0], 0.0)).astype(np.float64)
    threshold = float(np.quantile(ref_d, quantile))
    ref_median = float(np.median(ref_d))
    cur_median = float(np.median(cur_d))
    if ref_median > 0:
        ratio = cur_median / ref_median
    else:  # a reference of duplicates: any distance at all is infinitely farther
        ratio = float("inf") if cur_median > 0 else 1.0
    return Novelty(
        novel_share=float(np.mean(cur_d > threshold)),
        distance_ratio=ratio,
        threshold=threshold,
        reference_median=ref_median,
        current_median=cur_median,
        quantile=quantile,
        n_reference=int(ref.shape[0]),
        n_current=int(cur.shape[0]),
        seconds=time.perf_counter() - t0,
        current_distances=cur_d,
    )


def drift_kind(drift: bool, novel_share: float, novel_share_max: float) -> str:
    """``none`` without drift; with drift, ``novel`` (a new domain) when more than
    ``novel_share_max`` of the new images are far from every reference image, else ``shift``
    (the new images fall near things the reference knows: a new style, a new mix)."""
    if not drift:
        return "none"
    return "novel" if novel_share > novel_share_max else "shift"
