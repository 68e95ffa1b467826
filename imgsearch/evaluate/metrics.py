"""Retrieval metrics and feature-quality measures.

Retrieval metrics take, for each query, its ranking of the gallery as a boolean relevance row
(``relevance[q, i]`` is True when the gallery image at rank ``i + 1`` is relevant to query ``q``;
the query itself is never in its own ranking) and ``n_relevant[q]``, the number of relevant images
in the whole gallery. A row may be truncated to the first ``L`` ranks; the metrics below say which
are exact for which ``L``. Ties are whatever order the ranking gives (evaluate breaks score ties
by gallery order, see :mod:`imgsearch.evaluate.retrieval`).

Definitions, for a query with ``R = n_relevant`` relevant images and ``rel_i`` the relevance at
rank ``i``:

- ``hit_at_k`` (top-K accuracy; what metric-learning papers call "Recall@K"): 1 when any of the
  first k is relevant. Exact when ``L >= k``.
- ``precision_at_k``: ``sum(rel_1..k) / k`` (divided by k even when fewer than k are relevant).
- ``recall_at_k``: ``sum(rel_1..k) / R`` (the information-retrieval recall).
- ``ap`` (average precision over the full ranking): ``(1/R) sum_{i: rel_i} P@i``. With a
  truncated row, relevant images beyond ``L`` count as 0 (a lower bound; exact for a full row).
  Equals ``sklearn.metrics.average_precision_score`` on tie-free scores of the whole gallery.
- ``ap_at_r`` (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020):
  ``(1/R) sum_{i<=R, rel_i} P@i``; its mean over queries is MAP@R. Exact when ``L >= R``.
- ``r_precision``: ``sum(rel_1..R) / R``.
- :func:`average_precision_at_k` (one ranked list cut at k): ``(1/min(R, k)) sum_{i<=k, rel_i} P@i``.

Queries with ``R == 0`` get NaN per-query values; :func:`retrieval_metrics` leaves them out of
the means and counts them as ``n_queries_without_relevant``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def relevance_from_labels(ranked_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """``(Q, L)`` ranked gallery labels and ``(Q,)`` query labels -> ``(Q, L)`` bool relevance."""
    ranked_labels = np.asarray(ranked_labels)
    query_labels = np.asarray(query_labels)
    if ranked_labels.ndim != 2 or query_labels.shape != (ranked_labels.shape[0],):
        raise ValueError(
            f"expected ranked_labels (Q, L) and query_labels (Q,), got {ranked_labels.shape} and {query_labels.shape}"
        )
    return np.asarray(ranked_labels == query_labels[:, None], dtype=bool)


def per_query_metrics(
    relevance: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, np.ndarray]:
    """Per-query retrieval metrics (see the module docstring), each a float64 array of shape ``(Q,)``.

    Keys: ``hit_at_k``, ``precision_at_k``, ``recall_at_k`` for each k in ``ks``, ``ap``,
    ``ap_at_r``, ``r_precision``. Raises ``ValueError`` on bad shapes, a non-positive k, or a row
    holding more relevant images than its ``n_relevant``.
    """
    rel = np.asarray(relevance, dtype=bool)
    n_rel = np.asarray(n_relevant)
    if rel.ndim != 2 or n_rel.shape != (rel.shape[0],):
        raise ValueError(
            f"expected relevance (Q, L) and n_relevant (Q,), got {rel.shape} and {n_rel.shape}"
        )
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {tuple(ks)}")
    n_rel = n_rel.astype(np.float64)
    q, length = rel.shape
    cum = np.cumsum(rel, axis=1, dtype=np.float64)  # (Q, L): relevant found within the first i
    if length and np.any(cum[:, -1] > n_rel):
        raise ValueError("a ranking holds more relevant images than its n_relevant")
    has_rel = n_rel > 0
    safe_r = np.where(has_rel, n_rel, 1.0)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        k = int(k)
        found = cum[:, min(k, length) - 1] if length else np.zeros(q)
        out[f"hit_at_{k}"] = (found > 0).astype(np.float64)
        out[f"precision_at_{k}"] = found / k
        out[f"recall_at_{k}"] = found / safe_r

    ranks = np.arange(1, length + 1, dtype=np.float64)
    prec_at_rel = np.where(rel, cum / ranks, 0.0)  # P@i at the relevant ranks, 0 elsewhere
    out["ap"] = prec_at_rel.sum(axis=1) / safe_r
    within_r = ranks[None, :] <= n_rel[:, None]
    out["ap_at_r"] = np.where(within_r, prec_at_rel, 0.0).sum(axis=1) / safe_r
    out["r_precision"] = np.where(within_r, rel, False).sum(axis=1) / safe_r
    for key, value in out.items():
        out[key] = np.where(has_rel, value, np.nan)
    return out


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Names of the aggregate retrieval metrics, in a stable order (per-query ``ap`` -> ``map``)."""
    names = []
    for prefix in ("hit_at", "precision_at", "recall_at"):
        names += [f"{prefix}_{int(k)}" for k in ks]
    return names + ["map", "map_at_r", "r_precision"]


def aggregate(per_query: dict[str, np.ndarray], n_relevant: np.ndarray) -> dict[str, float]:
    """Means over the queries that have a relevant image (``ap`` -> ``map``, ``ap_at_r`` -> ``map_at_r``)."""
    has_rel = np.asarray(n_relevant) > 0
    out: dict[str, float] = {}
    for key, values in per_query.items():
        name = {"ap": "map", "ap_at_r": "map_at_r"}.get(key, key)
        out[name] = float(np.mean(values[has_rel])) if has_rel.any() else float("nan")
    out["n_queries"] = int(has_rel.sum())
    out["n_queries_without_relevant"] = int((~has_rel).sum())
    return out


def retrieval_metrics(
    relevance: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean retrieval metrics over queries with at least one relevant gallery image.

    Keys: ``hit_at_k``, ``precision_at_k``, ``recall_at_k`` (each k), ``map``, ``map_at_r``,
    ``r_precision``, ``n_queries`` (queries counted in the means) and
    ``n_queries_without_relevant`` (left out). Means are NaN when no query has a relevant image.
    """
    return aggregate(per_query_metrics(relevance, n_relevant, ks), np.asarray(n_relevant))


def average_precision_at_k(relevant: np.ndarray, n_relevant: int) -> float:
    """AP@k of one ranked list: ``sum_i P@i * rel_i / min(n_relevant, k)`` with k = len(list).

    relevant: (k,) booleans in rank order; n_relevant: relevant rows in the whole gallery.
    Equals scikit-learn's ``average_precision_score`` when the list ranks the whole gallery.
    Unlike ``ap`` of :func:`per_query_metrics` (divided by R), the divisor is capped at the list's
    length: the AP@k of a ranked list cut at k (what ranking tuning maximises).
    """
    rel = np.asarray(relevant, dtype=bool)
    if n_relevant <= 0:
        raise ValueError("average precision needs at least one relevant row")
    if not len(rel):
        return 0.0
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / min(n_relevant, len(rel)))


# --- feature quality -------------------------------------------------------------------------


def l2_normalise(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as float32."""
    x = np.asarray(emb, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def class_distances(emb: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cosine distance (``1 - cos``) over same-class pairs and over different-class pairs.

    Every unordered pair of distinct images counts once (pair-weighted means, so large classes
    weigh more). Computed exactly in O(N D) from class sums: for unit vectors,
    ``sum_{i != j in c} x_i.x_j = |sum_c x|^2 - n_c``. NaN when there is no such pair.
    """
    x = l2_normalise(emb).astype(np.float64)
    sq = np.sum(x * x, axis=1)  # 1, or 0 for zero rows
    _, inverse = np.unique(np.asarray(labels), return_inverse=True)
    n_classes = int(inverse.max()) + 1 if len(inverse) else 0
    sums = np.zeros((n_classes, x.shape[1]))
    np.add.at(sums, inverse, x)
    counts = np.bincount(inverse, minlength=n_classes).astype(np.float64)
    sq_by_class = np.bincount(inverse, weights=sq, minlength=n_classes)
    intra_dot = float(np.sum(np.sum(sums * sums, axis=1) - sq_by_class)) / 2.0
    intra_pairs = float(np.sum(counts * (counts - 1))) / 2.0
    total = x.sum(axis=0)
    all_dot = (float(total @ total) - float(sq.sum())) / 2.0
    n = float(len(x))
    all_pairs = n * (n - 1) / 2.0
    inter_dot = all_dot - intra_dot
    inter_pairs = all_pairs - intra_pairs
    intra = 1.0 - intra_dot / intra_pairs if intra_pairs > 0 else float("nan")
    inter = 1.0 - inter_dot / inter_pairs if inter_pairs > 0 else float("nan")
    return intra, inter


def _sample_by_class(labels: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """Indices of whole classes, in random order, until about ``max_points`` (keeps classes intact)."""
    if len(labels) <= max_points:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    chosen: list[np.ndarray] = []
    count = 0
    for c in rng.permutation(len(classes)):
        members = np.flatnonzero(inverse == c)
        chosen.append(members)
        count += len(members)
        if count >= max_points:
            break
    return np.sort(np.concatenate(chosen))


def feature_quality(
    emb: np.ndarray,
    labels: np.ndarray | Sequence[Any],
    categories: np.ndarray | Sequence[Any] | None = None,
    seed: int = 0,
    max_clusters: int = 512,
    sample_size: int = 2000,
) -> dict[str, float]:
    """How well embeddings group by class (item); keys prefixed ``fq_``.

    - ``fq_intra_dist``, ``fq_inter_dist``: mean cosine distance of same-class / different-class
      pairs (:func:`class_distances`); ``fq_ratio = intra / inter`` (lower is better).
    - ``fq_nmi``, ``fq_ari``: K-means (scikit-learn, k-means++, seeded) against the labels. k is
      the number of classes when ``2 <= k <= max_clusters`` and ``k < N``; otherwise, when
      ``categories`` are given, k is the number of categories and the clustering is scored
      against the categories (``fq_kmeans_on_category = 1``). NMI grows with k even for random
      clusters, so compare runs at the same k (``fq_kmeans_k``), not across datasets.
    - ``fq_silhouette``: scikit-learn silhouette with cosine distance and the class labels, on
      whole classes sampled up to ``sample_size`` points (sampling points instead would strip
      small classes of their partners). Singletons score 0 (scikit-learn's convention).
    - ``fq_embedding_std``: mean per-dimension std of the L2-normalised embeddings, a collapse
      measure: 0 when all embeddings coincide, about ``1/sqrt(D)`` when they spread isotropically.

    Values that cannot be computed (too few classes, no pairs) are NaN.
    """
    x = l2_normalise(emb)
    labels_arr = np.asarray(labels).astype(str)
    if x.ndim != 2 or len(labels_arr) != len(x):
        raise ValueError(
            f"expected emb (N, D) and labels (N,), got {x.shape} and {labels_arr.shape}"
        )
    n = len(x)
    nan = float("nan")
    out: dict[str, float] = {
        "fq_intra_dist": nan,
        "fq_inter_dist": nan,
        "fq_ratio": nan,
        "fq_nmi": nan,
        "fq_ari": nan,
        "fq_kmeans_k": nan,
        "fq_kmeans_on_category": nan,
        "fq_silhouette": nan,
        "fq_embedding_std": float(np.mean(np.std(x, axis=0))) if n else nan,
    }
    if n < 2:
        return out
    intra, inter = class_distances(x, labels_arr)
    out["fq_intra_dist"], out["fq_inter_dist"] = intra, inter
    if np.isfinite(intra) and np.isfinite(inter) and inter > 0:
        out["fq_ratio"] = intra / inter

    n_classes = len(np.unique(labels_arr))
    target: np.ndarray | None = None
    if 2 <= n_classes <= max_clusters and n_classes < n:
        target, on_category = labels_arr, 0.0
    elif categories is not None:
        cats = np.asarray(categories).astype(str)
        if len(cats) != n:
            raise ValueError(f"categories has {len(cats)} entries for {n} embeddings")
        if 2 <= len(np.unique(cats)) < n:
            target, on_category = cats, 1.0
    if target is not None:
        k = len(np.unique(target))
        # k-means++ makes many small BLAS calls: multi-threaded OpenBLAS made them ~20x slower on
        # a busy 2-core machine (141 s vs 7 s for k=384, N=1.5k, D=1280), so BLAS is kept to 1 thread.
        with threadpool_limits(limits=1, user_api="blas"):
            clusters = KMeans(n_clusters=k, random_state=seed, n_init=1).fit_predict(x)
        out["fq_nmi"] = float(normalized_mutual_info_score(target, clusters))
        out["fq_ari"] = float(adjusted_rand_score(target, clusters))
        out["fq_kmeans_k"], out["fq_kmeans_on_category"] = float(k), on_category
    else:
        log.info("feature_quality: no usable labels for K-means (%d classes, N=%d)", n_classes, n)

    idx = _sample_by_class(labels_arr, sample_size, seed)
    sample_classes = len(np.unique(labels_arr[idx]))
    if 2 <= sample_classes <= len(idx) - 1:
        out["fq_silhouette"] = float(silhouette_score(x[idx], labels_arr[idx], metric="cosine"))
    return out
