"""Is an int8 extractor good enough? Retrieval quality of its embeddings against fp32's.

A cosine between int8 and fp32 vectors says how far each vector moved, not whether the ranking
survived: the decision is on MAP@R (:func:`imgsearch.evaluate.retrieval.retrieval_map_at_r`, the
project's one implementation), the same images embedded both ways, grouped by item. Computing
and deciding are separate (:func:`int8_scores`, then :func:`mark`); :func:`quality_check` does
both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgsearch.evaluate.metrics import l2_normalise
from imgsearch.evaluate.retrieval import retrieval_map_at_r

#: int8 is kept when its MAP@R is at most this much below fp32's (issue #16).
DEFAULT_TOLERANCE = 0.005


def int8_scores(
    fp32_emb: np.ndarray,
    int8_emb: np.ndarray,
    labels: np.ndarray | Sequence[Any],
    *,
    max_queries: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """MAP@R of both embeddings of the same images (``labels``: their item ids) and cosines.

    ``fp32_emb``, ``int8_emb``: ``(N, D)``, row ``i`` the same image. Returns ``map_at_r_fp32``,
    ``map_at_r_int8``, ``map_at_r_drop`` (fp32 - int8; NaN when there is no query with a relevant
    image), ``min_cosine``, ``mean_cosine`` and ``n_images``. Raises ``ValueError`` on shapes
    that do not match.
    """
    a = np.asarray(fp32_emb, dtype=np.float32)
    b = np.asarray(int8_emb, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"fp32 {a.shape} and int8 {b.shape} embeddings must both be (N, D)")
    if len(labels) != len(a):
        raise ValueError(f"{len(labels)} labels for {len(a)} embeddings")
    fp32_map = retrieval_map_at_r(a, labels, max_queries=max_queries, seed=seed)
    int8_map = retrieval_map_at_r(b, labels, max_queries=max_queries, seed=seed)
    cosine = (l2_normalise(a) * l2_normalise(b)).sum(axis=1) if len(a) else np.zeros(0)
    return {
        "map_at_r_fp32": fp32_map,
        "map_at_r_int8": int8_map,
        "map_at_r_drop": fp32_map - int8_map,
        "min_cosine": float(cosine.min()) if len(cosine) else math.nan,
        "mean_cosine": float(cosine.mean()) if len(cosine) else math.nan,
        "n_images": float(len(a)),
    }


def mark(scores: dict[str, float], tolerance: float = DEFAULT_TOLERANCE) -> tuple[bool, str]:
    """``(keep, reason)``: keep int8 when its MAP@R is at most ``tolerance`` below fp32's."""
    drop = scores["map_at_r_drop"]
    if not math.isfinite(drop):
        return False, "MAP@R cannot be measured: no check image has another image of its item"
    if drop > tolerance:
        return False, (
            f"int8 MAP@R {scores['map_at_r_int8']:.4f} is {drop:.4f} below fp32's "
            f"{scores['map_at_r_fp32']:.4f} (tolerance {tolerance})"
        )
    return True, (
        f"int8 MAP@R {scores['map_at_r_int8']:.4f} vs fp32 {scores['map_at_r_fp32']:.4f} "
        f"(drop {drop:.4f} <= {tolerance})"
    )


def quality_check(
    fp32_emb: np.ndarray,
    int8_emb: np.ndarray,
    labels: np.ndarray | Sequence[Any],
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    max_queries: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`int8_scores` plus the decision: ``keep`` (bool), ``reason`` (str), ``tolerance``."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    scores: dict[str, Any] = int8_scores(
        fp32_emb, int8_emb, labels, max_queries=max_queries, seed=seed
    )
    keep, reason = mark(scores, tolerance)
    return {**scores, "keep": keep, "reason": reason, "tolerance": float(tolerance)}
