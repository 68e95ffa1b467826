"""Cross-modal retrieval figures: queries of one kind (texts) against a gallery of another (images).

The protocol (text -> image, the one every reported text-search figure follows):

    Each query is an embedding in the image space (a text passed through the aligned text
    tower) with the item it describes; the gallery is a set of image embeddings with their items.
    The query ranks the whole gallery by cosine similarity (inner product of L2-normalised
    vectors; ties broken by gallery order); relevant = the gallery images of the query's item. A
    query whose item has no image in the gallery is left out of the means and counted in
    ``n_queries_without_relevant``. The metric names and definitions are those of
    :mod:`imgsearch.evaluate.metrics` (``hit_at_k``, ``map_at_r``, ...).

:func:`chance_scores` gives the same figures for a ranking that knows nothing (uniformly random
scores, averaged over seeds), to print beside the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from imgsearch.evaluate import metrics as M

_BLOCK_BYTES = 64 * 2**20


def top_order(neg_scores: np.ndarray, length: int) -> np.ndarray:
    """Column positions of each row's ``length`` smallest values, in order (stable ties).

    ``neg_scores`` is ``(B, G)`` negated similarities; a partial sort when ``length < G``.
    """
    g = neg_scores.shape[1]
    length = max(0, min(int(length), g))
    if length >= g:
        return np.argsort(neg_scores, axis=1, kind="stable")
    if length == 0:
        return np.zeros((len(neg_scores), 0), dtype=np.int64)
    part = np.sort(np.argpartition(neg_scores, length - 1, axis=1)[:, :length], axis=1)
    sub = np.argsort(np.take_along_axis(neg_scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, sub, axis=1)


def _codes(
    query_labels: Sequence[Any] | np.ndarray, gallery_labels: Sequence[Any] | np.ndarray
) -> tuple[np.ndarray, ...]:
    q = np.asarray(query_labels).astype(str)
    g = np.asarray(gallery_labels).astype(str)
    _, inverse = np.unique(np.concatenate([g, q]), return_inverse=True)
    g_codes, q_codes = inverse[: len(g)], inverse[len(g) :]
    counts = np.bincount(g_codes, minlength=int(inverse.max()) + 1 if len(inverse) else 0)
    return q_codes, g_codes, counts


def rank_cross(
    queries: np.ndarray,
    query_labels: Sequence[Any] | np.ndarray,
    gallery: np.ndarray,
    gallery_labels: Sequence[Any] | np.ndarray,
    depth: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(order, relevance, n_relevant)`` per block of queries (positions into the gallery)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    x = np.ascontiguousarray(gallery, dtype=np.float32)
    if q.ndim != 2 or x.ndim != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"queries {q.shape} and gallery {x.shape} must be (N, D) with the same D")
    if len(query_labels) != len(q) or len(gallery_labels) != len(x):
        raise ValueError("one label per query and per gallery row is needed")
    q_codes, g_codes, counts = _codes(query_labels, gallery_labels)
    length = len(x) if depth is None else min(int(depth), len(x))
    step = max(1, min(4096, _BLOCK_BYTES // (13 * max(len(x), 1))))
    for start in range(0, len(q), step):
        block = slice(start, start + step)
        order = top_order(-(q[block] @ x.T), length)
        relevance = g_codes[order] == q_codes[block][:, None]
        yield order, relevance, counts[q_codes[block]]


def cross_modal_scores(
    queries: np.ndarray,
    query_labels: Sequence[Any] | np.ndarray,
    gallery: np.ndarray,
    gallery_labels: Sequence[Any] | np.ndarray,
    ks: Sequence[int] = (1, 10),
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Aggregate metrics and the per-query arrays (same keys as ``metrics.per_query_metrics``).

    Rankings are sorted to the depth the metrics need (the largest k, or the largest number of
    relevant images), so ``map`` (full-ranking AP) is not returned.
    """
    gallery_counts = np.unique(np.asarray(gallery_labels).astype(str), return_counts=True)[1]
    depth = max([int(k) for k in ks] + [int(gallery_counts.max()) if len(gallery_counts) else 0])
    parts: list[dict[str, np.ndarray]] = []
    n_rel_parts: list[np.ndarray] = []
    for _, rel, n_rel in rank_cross(queries, query_labels, gallery, gallery_labels, depth):
        parts.append(M.per_query_metrics(rel, n_rel, ks))
        n_rel_parts.append(n_rel)
    if not parts:
        per_query = M.per_query_metrics(np.zeros((0, 0), bool), np.zeros(0), ks)
        n_rel_all = np.zeros(0, dtype=np.int64)
    else:
        per_query = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n_rel_all = np.concatenate(n_rel_parts)
    per_query.pop("ap", None)
    out = M.aggregate(per_query, n_rel_all)
    out["n_gallery"] = len(gallery_labels)
    return out, per_query


def chance_scores(
    query_labels: Sequence[Any] | np.ndarray,
    gallery_labels: Sequence[Any] | np.ndarray,
    ks: Sequence[int] = (1, 10),
    seeds: int = 5,
    dim: int = 64,
) -> dict[str, float]:
    """The same figures for random embeddings (mean over ``seeds``): what knowing nothing scores."""
    runs: list[dict[str, float]] = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        q = M.l2_normalise(rng.standard_normal((len(query_labels), dim)).astype(np.float32))
        g = M.l2_normalise(rng.standard_normal((len(gallery_labels), dim)).astype(np.float32))
        runs.append(cross_modal_scores(q, query_labels, g, gallery_labels, ks)[0])
    keys = [k for k in runs[0] if k not in ("n_queries", "n_queries_without_relevant", "n_gallery")]
    return {k: float(np.mean([r[k] for r in runs])) for k in keys}
