"""Is an int8 extractor good enough? Retrieval quality of its embeddings against fp32's.

A cosine between int8 and fp32 vectors says how far each vector moved, not whether the ranking
survived: the decision is on MAP@R (:func:`imgsearch.evaluate.retrieval.retrieval_map_at_r`, the
project's one implementation), the same images embedded both ways, grouped by item. Two int8
figures are checked against fp32's, and the worse one decides:

- ``map_at_r_int8``: int8 queries against the int8 gallery (everything int8);
- ``map_at_r_mixed``: one precision's queries against the other's gallery. For extraction
  (``int8_queries=False``): fp32 queries against the int8 gallery, what search gives when the
  index is built from int8 embeddings but queries are embedded by the registered fp32 extractor.
  For serving (``int8_queries=True``): int8 queries against the fp32 gallery, what an int8 query
  path gives over an index built in fp32. Same protocol (leave-one-out, relevant = same item,
  ties by gallery order), ranked here, scored by :func:`imgsearch.evaluate.metrics.per_query_metrics`.

:func:`whole_items` picks the check images: whole items (every image of each), seeded.

Computing and deciding are separate (:func:`int8_scores`, then :func:`mark`);
:func:`quality_check` does both.

Serving's int8 (:mod:`imgsearch.search.query`) has the index itself: :func:`searched_check` ranks
fp32 and int8 query vectors of gallery images through the index's own search (every gallery
image a distractor, the query's own row left out) and compares their MAP@R, which is what the
served model will give.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from imgsearch.evaluate import metrics as M
from imgsearch.evaluate.cross_modal import top_order
from imgsearch.evaluate.metrics import l2_normalise
from imgsearch.evaluate.retrieval import retrieval_map_at_r

#: int8 is kept when its MAP@R is at most this much below fp32's (issue #16).
DEFAULT_TOLERANCE = 0.005

#: An index's search: ``(Q, D)`` unit vectors and ``k`` -> ``(Q, k)`` gallery positions, best
#: first (-1 where there is no result).
Search = Callable[[np.ndarray, int], np.ndarray]


def whole_items(items: pd.Series, n: int, seed: int = 0, min_images: int = 1) -> np.ndarray:
    """Boolean mask over ``items`` (one item id per image): whole items in a seeded order, as many
    as fit in ``n`` images (at least one item); only items with ``min_images`` or more images.
    Every image is taken when they all fit."""
    ids = items.astype(str)
    sizes = ids.value_counts()
    sizes = sizes[sizes >= min_images]
    eligible = ids.isin(sizes.index).to_numpy()
    if int(sizes.sum()) <= n:
        return eligible
    order = np.random.default_rng(seed).permutation(np.sort(sizes.index.to_numpy()))
    cumulative = np.cumsum(sizes.reindex(order).to_numpy())
    keep = order[: max(1, int(np.searchsorted(cumulative, n, side="right")))]
    return ids.isin(set(keep)).to_numpy()


def mixed_map_at_r(
    queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray | Sequence[Any]
) -> float:
    """MAP@R of ``queries[i]`` against ``gallery`` without row ``i`` (the same image in the other
    precision); relevant = same label. NaN when no query has a relevant image."""
    q, g = l2_normalise(queries), l2_normalise(gallery)
    codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)[1]
    counts = np.bincount(codes)
    depth = max(int(counts.max()) - 1, 1) if len(counts) else 0
    parts, n_rels = [], []
    step = max(1, 2**24 // max(len(g), 1))
    for start in range(0, len(q), step):
        rows = np.arange(start, min(start + step, len(q)))
        neg = -(q[rows] @ g.T)
        neg[np.arange(len(rows)), rows] = np.inf  # never the query's own image
        order = top_order(neg, min(depth, len(g) - 1))
        n_rel = counts[codes[rows]] - 1
        parts.append(M.per_query_metrics(codes[order] == codes[rows][:, None], n_rel, (1,)))
        n_rels.append(n_rel)
    if not parts:
        return float("nan")
    per_query = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return float(M.aggregate(per_query, np.concatenate(n_rels))["map_at_r"])


def int8_scores(
    fp32_emb: np.ndarray,
    int8_emb: np.ndarray,
    labels: np.ndarray | Sequence[Any],
    *,
    max_queries: int | None = None,
    seed: int = 0,
    int8_queries: bool = False,
) -> dict[str, float]:
    """MAP@R of both embeddings of the same images (``labels``: their item ids) and cosines.

    ``fp32_emb``, ``int8_emb``: ``(N, D)``, row ``i`` the same image. Returns ``map_at_r_fp32``,
    ``map_at_r_int8``, ``map_at_r_mixed`` (fp32 queries on the int8 gallery, or with
    ``int8_queries`` int8 queries on the fp32 gallery), ``map_at_r_drop``
    (fp32 minus the worse of the two int8 figures; NaN when there is no query with a relevant
    image), ``min_cosine``, ``mean_cosine`` and ``n_images``. ``max_queries`` samples the
    queries of the int8/fp32 figures only (the mixed one uses every image). Raises
    ``ValueError`` on shapes that do not match.
    """
    a = np.asarray(fp32_emb, dtype=np.float32)
    b = np.asarray(int8_emb, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"fp32 {a.shape} and int8 {b.shape} embeddings must both be (N, D)")
    if len(labels) != len(a):
        raise ValueError(f"{len(labels)} labels for {len(a)} embeddings")
    fp32_map = retrieval_map_at_r(a, labels, max_queries=max_queries, seed=seed)
    int8_map = retrieval_map_at_r(b, labels, max_queries=max_queries, seed=seed)
    mixed_map = mixed_map_at_r(b, a, labels) if int8_queries else mixed_map_at_r(a, b, labels)
    return {
        "map_at_r_fp32": fp32_map,
        "map_at_r_int8": int8_map,
        "map_at_r_mixed": mixed_map,
        "map_at_r_drop": fp32_map - min(int8_map, mixed_map),
        **_cosines(a, b),
        "int8_queries": float(int8_queries),
    }


def _cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Row-wise cosine of the two embeddings of each image: ``min_cosine``, ``mean_cosine``,
    ``n_images``."""
    cosine = (l2_normalise(a) * l2_normalise(b)).sum(axis=1) if len(a) else np.zeros(0)
    return {
        "min_cosine": float(cosine.min()) if len(cosine) else math.nan,
        "mean_cosine": float(cosine.mean()) if len(cosine) else math.nan,
        "n_images": float(len(a)),
    }


def mark(scores: dict[str, float], tolerance: float = DEFAULT_TOLERANCE) -> tuple[bool, str]:
    """``(keep, reason)``: keep int8 when both its MAP@Rs (int8 and mixed) are at most
    ``tolerance`` below fp32's."""
    mixed = "int8 queries on fp32" if scores.get("int8_queries") else "fp32 queries on int8"
    figures = (
        f"int8 MAP@R {scores['map_at_r_int8']:.4f}, {mixed} gallery "
        f"{scores['map_at_r_mixed']:.4f}, fp32 {scores['map_at_r_fp32']:.4f}"
    )
    return _decide(scores["map_at_r_drop"], figures, tolerance, scores["map_at_r_fp32"])


def _decide(drop: float, figures: str, tolerance: float, fp32_map: float) -> tuple[bool, str]:
    """``(keep, reason)`` from the MAP@R drop of int8 (NaN: nothing to measure on). A check whose
    fp32 MAP@R is itself at most ``tolerance`` cannot see a loss (int8 could lose everything and
    stay within it): inconclusive, so fp32 runs; unless ``tolerance >= 1``, which accepts any loss
    and so needs no evidence."""
    if not math.isfinite(drop):
        return False, "MAP@R cannot be measured: no check image has another image of its item"
    if not fp32_map > tolerance and tolerance < 1:
        return False, (
            f"{figures}: inconclusive, fp32's own MAP@R {fp32_map:.4f} is within the tolerance "
            f"{tolerance} of 0 (the check images' items are not found)"
        )
    if drop > tolerance:
        return False, f"{figures}: {drop:.4f} below fp32 (tolerance {tolerance})"
    return True, f"{figures}: drop {drop:.4f} <= {tolerance}"


def quality_check(
    fp32_emb: np.ndarray,
    int8_emb: np.ndarray,
    labels: np.ndarray | Sequence[Any],
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    max_queries: int | None = None,
    seed: int = 0,
    int8_queries: bool = False,
) -> dict[str, Any]:
    """:func:`int8_scores` plus the decision: ``keep`` (bool), ``reason`` (str), ``tolerance``."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    scores: dict[str, Any] = int8_scores(
        fp32_emb, int8_emb, labels, max_queries=max_queries, seed=seed, int8_queries=int8_queries
    )
    keep, reason = mark(scores, tolerance)
    return {**scores, "keep": keep, "reason": reason, "tolerance": float(tolerance)}


def searched_map_at_r(
    queries: np.ndarray,
    own: np.ndarray | Sequence[int],
    gallery_labels: np.ndarray | Sequence[Any],
    search: Search,
) -> float:
    """MAP@R of ``queries`` ranked by ``search`` over a gallery labelled ``gallery_labels``;
    query ``i`` is the image at gallery position ``own[i]``: that row is left out of its results,
    relevant = the other rows of its label. NaN when no query has a relevant row."""
    codes = np.unique(np.asarray(gallery_labels).astype(str), return_inverse=True)[1]
    counts = np.bincount(codes)
    own_rows = np.asarray(own, dtype=np.int64)
    if len(own_rows) != len(queries):
        raise ValueError(f"{len(own_rows)} gallery positions for {len(queries)} queries")
    query_codes = codes[own_rows]
    n_rel = counts[query_codes] - 1
    if not len(n_rel) or n_rel.max() < 1:
        return float("nan")
    depth = int(n_rel.max())
    found = np.asarray(search(l2_normalise(queries), depth + 1), dtype=np.int64)
    # the query's own row out (stable: the others keep their order), then the first `depth`
    own_hit = found == own_rows[:, None]
    order = np.argsort(own_hit, axis=1, kind="stable")[:, :depth]
    ranked = np.take_along_axis(found, order, axis=1)
    relevant = (ranked >= 0) & (codes[np.maximum(ranked, 0)] == query_codes[:, None])
    per_query = M.per_query_metrics(relevant, n_rel, (1,))
    return float(M.aggregate(per_query, n_rel)["map_at_r"])


def searched_check(
    fp32_emb: np.ndarray,
    int8_emb: np.ndarray,
    own: np.ndarray | Sequence[int],
    gallery_labels: np.ndarray | Sequence[Any],
    search: Search,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """:func:`searched_map_at_r` of fp32 and of int8 queries of the same gallery images, and the
    decision: ``map_at_r_fp32``, ``map_at_r_int8``, ``map_at_r_drop``, ``min_cosine``,
    ``mean_cosine``, ``n_images``, ``keep``, ``reason``, ``tolerance``."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    a = np.asarray(fp32_emb, dtype=np.float32)
    b = np.asarray(int8_emb, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"fp32 {a.shape} and int8 {b.shape} embeddings must both be (N, D)")
    fp32_map = searched_map_at_r(a, own, gallery_labels, search)
    int8_map = searched_map_at_r(b, own, gallery_labels, search)
    drop = fp32_map - int8_map
    figures = f"int8 queries MAP@R {int8_map:.4f}, fp32 queries {fp32_map:.4f} on the index"
    keep, reason = _decide(drop, figures, tolerance, fp32_map)
    return {
        "map_at_r_fp32": fp32_map,
        "map_at_r_int8": int8_map,
        "map_at_r_drop": drop,
        **_cosines(a, b),
        "keep": keep,
        "reason": reason,
        "tolerance": float(tolerance),
    }
