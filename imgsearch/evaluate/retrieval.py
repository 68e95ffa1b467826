"""Evaluate embeddings: retrieval on one split and feature quality (plots: :mod:`imgsearch.evaluate.plots`).

Gallery and queries (the protocol every reported figure follows):

    Only the images of the chosen split (``test`` by default) take part. Each of them, in turn, is
    a query against all the OTHER images of that split (the query itself is excluded from its own
    ranking); the relevant images are those of the same ``item_id``. Search is exact: cosine
    similarity (inner product of L2-normalised embeddings), computed by numpy matrix products in
    blocks of queries so memory stays bounded for large splits. Score ties are broken by gallery
    order (images sorted by ``image_id``), so results are deterministic. An image whose item has
    no other image in the split still sits in the gallery as a distractor, but as a query it has
    nothing to find: it is left out of the means and counted in ``n_queries_without_relevant``.
    With ``max_queries`` set, a seeded random subset of queries is searched against the whole
    split gallery.

Aggregate metric names (stable; runs are compared by them in the MLflow UI): ``hit_at_{k}``,
``precision_at_{k}``, ``recall_at_{k}`` for each k, ``map``, ``map_at_r``, ``r_precision``,
``n_queries``, ``n_queries_without_relevant``, ``n_gallery``, ``n_items``,
``n_missing_embeddings``, and the feature-quality ``fq_*`` names of
:func:`imgsearch.evaluate.metrics.feature_quality`. Definitions are in :mod:`imgsearch.evaluate.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.errors import CatalogError, ConfigError
from imgsearch.evaluate import metrics as M

log = logging.getLogger(__name__)

ALL_SPLITS = "all"
_NA_CATEGORY = "<NA>"
_BLOCK_BYTES = 64 * 2**20  # working memory of one block of queries (scores + order + relevance)


@dataclass
class EvaluateConfig:
    """``split``: train | val | test | all. ``max_queries``: None for every image of the split."""

    split: str = "test"
    ks: Sequence[int] = (1, 5, 10)
    by_category: bool = True
    category_column: str = schema.CATEGORY
    feature_quality: bool = True
    max_queries: int | None = None
    seed: int = 0
    max_clusters: int = 512
    plots: bool = True
    plot_methods: Sequence[str] = ("tsne", "umap")
    plot_max_points: int = 2000
    report: bool = True  # report.html: figures, example queries with thumbnails, worst queries
    # out-of-domain probe (the evaluate step: imgsearch.evaluate.probe): a folder of real images,
    # category = folder; None = no probe. probe_exclude: category folders left out.
    probe_dir: str | None = None
    probe_exclude: Sequence[str] = ()
    probe_min_per_category: int = 10

    def __post_init__(self) -> None:
        if self.split not in (*schema.SPLITS, ALL_SPLITS):
            raise ConfigError(
                f"evaluate.split must be one of {(*schema.SPLITS, ALL_SPLITS)}, got {self.split!r}"
            )
        self.ks = tuple(int(k) for k in self.ks)
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"evaluate.ks must be positive integers, got {self.ks}")
        if self.max_queries is not None and int(self.max_queries) < 1:
            raise ConfigError(f"evaluate.max_queries must be None or >= 1, got {self.max_queries}")
        self.plot_methods = tuple(self.plot_methods)
        self.probe_exclude = tuple(str(c) for c in self.probe_exclude)
        unknown = set(self.plot_methods) - {"tsne", "umap"}
        if unknown:
            raise ConfigError(
                f"evaluate.plot_methods: unknown {sorted(unknown)} (known: tsne, umap)"
            )


@dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    per_category: pd.DataFrame
    per_query: pd.DataFrame
    extra: dict[str, Any] = field(default_factory=dict)


# --- exact ranking in blocks -----------------------------------------------------------------


def _block_size(n_gallery: int) -> int:
    return max(1, min(4096, _BLOCK_BYTES // (13 * max(n_gallery, 1))))


def rank_relevance(
    emb: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray | None = None,
    depth: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(query_positions, order, relevance, n_relevant)`` block by block.

    ``emb`` (G, D) must be L2-normalised; ``labels`` (G,) are the gallery labels; ``queries`` are
    positions in the gallery (default: all). Each query is ranked against the other G-1 images
    (ties broken by gallery position). ``relevance`` is ``(B, L)`` bool with ``L = G - 1`` or
    ``depth`` when smaller (partial sort: exact for metrics that only look at the first L ranks);
    ``order`` (B, L) holds the gallery positions in rank order.
    """
    x = np.ascontiguousarray(emb, dtype=np.float32)
    g = len(x)
    codes = np.unique(np.asarray(labels), return_inverse=True)[1]
    counts = np.bincount(codes)
    qs = np.arange(g) if queries is None else np.asarray(queries, dtype=np.int64)
    length = g - 1 if depth is None else max(0, min(int(depth), g - 1))
    step = _block_size(g)
    for start in range(0, len(qs), step):
        qpos = qs[start : start + step]
        scores = x[qpos] @ x.T
        scores[np.arange(len(qpos)), qpos] = -np.inf  # the query is never its own result
        neg = -scores
        if length >= g - 1:
            order = np.argsort(neg, axis=1, kind="stable")[:, :length]
        elif length == 0:
            order = np.zeros((len(qpos), 0), dtype=np.int64)
        else:
            part = np.sort(np.argpartition(neg, length - 1, axis=1)[:, :length], axis=1)
            sub = np.argsort(np.take_along_axis(neg, part, axis=1), axis=1, kind="stable")
            order = np.take_along_axis(part, sub, axis=1)
        relevance = codes[order] == codes[qpos][:, None]
        yield qpos, order, relevance, counts[codes[qpos]] - 1


def retrieval_scores(
    emb: np.ndarray,
    item_ids: np.ndarray | Sequence[Any],
    ks: Sequence[int] = (1,),
    max_queries: int | None = None,
    seed: int = 0,
    full_ranking: bool = False,
) -> dict[str, float]:
    """Fast retrieval figures of a whole embedding set (e.g. the validation split, each epoch).

    Same protocol as :func:`evaluate` (each image queries all the others; relevant = same item;
    cosine; embeddings are L2-normalised here), but the rankings are only sorted to the depth the
    returned metrics need, so ``map`` (full-ranking AP) is not returned, unless ``full_ranking``
    (every ranking sorted to the end, ``map`` returned too). Keys: ``map_at_r``,
    ``r_precision``, ``hit_at_k``/``precision_at_k``/``recall_at_k`` for ``ks``, ``n_queries``,
    ``n_queries_without_relevant``.
    """
    x = M.l2_normalise(emb)
    labels = np.asarray(item_ids).astype(str)
    if len(labels) != len(x):
        raise ValueError(f"{len(labels)} item ids for {len(x)} embeddings")
    _, counts = np.unique(labels, return_counts=True)
    depth = max(int(counts.max()) - 1 if len(counts) else 0, *(int(k) for k in ks))
    queries = sample_queries(len(x), max_queries, seed)
    parts: list[dict[str, np.ndarray]] = []
    n_rel_parts: list[np.ndarray] = []
    for _, _, rel, n_rel in rank_relevance(x, labels, queries, None if full_ranking else depth):
        parts.append(M.per_query_metrics(rel, n_rel, ks))
        n_rel_parts.append(n_rel)
    per_query = _concat(parts)
    if not full_ranking:
        per_query.pop("ap", None)
    n_rel_all = np.concatenate(n_rel_parts) if n_rel_parts else np.zeros(0, dtype=np.int64)
    return M.aggregate(per_query, n_rel_all)


def retrieval_map_at_r(
    emb: np.ndarray,
    item_ids: np.ndarray | Sequence[Any],
    max_queries: int | None = None,
    seed: int = 0,
) -> float:
    """MAP@R of ``emb`` grouped by ``item_ids`` (see :func:`retrieval_scores`); NaN without queries."""
    return float(
        retrieval_scores(emb, item_ids, ks=(1,), max_queries=max_queries, seed=seed)["map_at_r"]
    )


def sample_queries(n: int, max_queries: int | None, seed: int) -> np.ndarray:
    """Positions of the queries: all ``n``, or a seeded sorted sample of ``max_queries``."""
    if max_queries is None or max_queries >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(max_queries), replace=False))


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# --- evaluate --------------------------------------------------------------------------------


def _gallery(
    ids: np.ndarray, emb: np.ndarray, manifest: pd.DataFrame, cfg: EvaluateConfig
) -> tuple[pd.DataFrame, np.ndarray, int]:
    """Rows of the split that have an embedding (sorted by image_id), their embeddings, and the missing count."""
    needed = [schema.IMAGE_ID, schema.ITEM_ID] + ([schema.SPLIT] if cfg.split != ALL_SPLITS else [])
    missing_cols = [c for c in needed if c not in manifest.columns]
    if missing_cols:
        raise CatalogError(f"manifest lacks columns {missing_cols} (run the split stage first?)")
    ids = np.asarray(ids).astype(str)
    emb = np.asarray(emb)
    if emb.ndim != 2 or len(ids) != len(emb):
        raise ValueError(f"expected ids (N,) and emb (N, D), got {ids.shape} and {emb.shape}")
    if len(np.unique(ids)) != len(ids):
        raise CatalogError("embedding ids are not unique")
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings hold NaN or inf values")
    rows = manifest if cfg.split == ALL_SPLITS else manifest[manifest[schema.SPLIT] == cfg.split]
    rows = rows.assign(**{schema.IMAGE_ID: rows[schema.IMAGE_ID].astype(str)})
    rows = rows.sort_values(schema.IMAGE_ID, kind="stable").reset_index(drop=True)
    pos = pd.Index(ids).get_indexer(rows[schema.IMAGE_ID])
    n_missing = int((pos < 0).sum())
    if n_missing:
        log.warning(
            "%d images of split %r have no embedding (extract failures?): left out",
            n_missing,
            cfg.split,
        )
    rows = rows[pos >= 0].reset_index(drop=True)
    if len(rows) < 2:
        raise CatalogError(
            f"split {cfg.split!r} has {len(rows)} images with embeddings: nothing to evaluate"
        )
    return rows, M.l2_normalise(emb[pos[pos >= 0]]), n_missing


def _categories(rows: pd.DataFrame, column: str) -> pd.Series | None:
    if column not in rows.columns:
        return None
    values = rows[column].astype("object")
    return values.where(values.notna() & (values.astype(str) != ""), _NA_CATEGORY).astype(str)


def evaluate(
    ids: np.ndarray, emb: np.ndarray, manifest: pd.DataFrame, cfg: EvaluateConfig
) -> EvaluateResult:
    """Retrieval metrics and feature quality of ``emb`` (rows keyed by ``ids``) on split ``cfg.split``.

    The gallery/query protocol is in the module docstring. ``manifest`` needs ``image_id``,
    ``item_id`` and ``split`` (unless ``cfg.split == "all"``); embeddings of images outside the
    split are ignored, images of the split without an embedding are counted as
    ``n_missing_embeddings``. Raises :class:`~imgsearch.errors.CatalogError` when the split has
    fewer than two embedded images or ids are duplicated, ``ValueError`` on non-finite embeddings.

    Returns ``metrics`` (the stable names), ``per_query`` (one row per query: ids, category,
    ``n_relevant``, ``first_relevant_rank``, ``top1_image_id``, ``top1_item_id``, ``top_ids`` (the
    first ``max(ks)`` result ids, ``;``-joined) and the per-query
    metrics with ``ap``/``ap_at_r`` for AP and AP@R) and ``per_category`` (one row per query
    category: ``n_queries``, ``n_queries_without_relevant`` and the aggregate metrics).
    """
    rows, x, n_missing = _gallery(ids, emb, manifest, cfg)
    labels = rows[schema.ITEM_ID].astype(str).to_numpy()
    queries = sample_queries(len(rows), cfg.max_queries, cfg.seed)

    parts: list[dict[str, np.ndarray]] = []
    qpos_parts, n_rel_parts, first_parts, top1_parts, top_parts = [], [], [], [], []
    for qpos, order, rel, n_rel in rank_relevance(x, labels, queries):
        parts.append(M.per_query_metrics(rel, n_rel, cfg.ks))
        qpos_parts.append(qpos)
        n_rel_parts.append(n_rel)
        any_rel = rel.any(axis=1)
        first_parts.append(np.where(any_rel, rel.argmax(axis=1) + 1.0, np.nan))
        top1_parts.append(order[:, 0])
        top_parts.append(order[:, : max(cfg.ks)])
    per_query_values = _concat(parts)
    qpos_all = np.concatenate(qpos_parts)
    n_rel_all = np.concatenate(n_rel_parts)

    per_query = pd.DataFrame(
        {
            schema.IMAGE_ID: rows[schema.IMAGE_ID].to_numpy()[qpos_all],
            schema.ITEM_ID: labels[qpos_all],
        }
    )
    cats = _categories(rows, cfg.category_column)
    if cats is not None:
        per_query[cfg.category_column] = cats.to_numpy()[qpos_all]
    per_query["n_relevant"] = n_rel_all
    per_query["first_relevant_rank"] = np.concatenate(first_parts)
    top1 = np.concatenate(top1_parts)
    per_query["top1_image_id"] = rows[schema.IMAGE_ID].to_numpy()[top1]
    per_query["top1_item_id"] = labels[top1]
    # the first max(ks) results, for the report's gallery (";"-joined image ids)
    gallery_ids = rows[schema.IMAGE_ID].astype(str).to_numpy()
    per_query["top_ids"] = [";".join(gallery_ids[r]) for part in top_parts for r in part]
    for key, values in per_query_values.items():
        per_query[key] = values

    metrics: dict[str, Any] = M.aggregate(per_query_values, n_rel_all)
    metrics["n_gallery"] = len(rows)
    metrics["n_items"] = int(len(np.unique(labels)))
    metrics["n_missing_embeddings"] = n_missing
    if cfg.feature_quality:
        metrics.update(
            M.feature_quality(
                x,
                labels,
                None if cats is None else cats.to_numpy(),
                seed=cfg.seed,
                max_clusters=cfg.max_clusters,
            )
        )
    per_category = (
        _per_category(per_query, cfg)
        if cfg.by_category and cats is not None
        else _empty_per_category(cfg)
    )
    log.info(
        "evaluate %s: %d queries on %d images, hit@1 %.3f, mAP %.3f, MAP@R %.3f",
        cfg.split,
        metrics["n_queries"],
        len(rows),
        metrics.get("hit_at_1", float("nan")),
        metrics["map"],
        metrics["map_at_r"],
    )
    return EvaluateResult(metrics=metrics, per_category=per_category, per_query=per_query)


def _per_category_columns(cfg: EvaluateConfig) -> list[str]:
    return [cfg.category_column, "n_queries", "n_queries_without_relevant", *M.metric_names(cfg.ks)]


def _empty_per_category(cfg: EvaluateConfig) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype="float64") for c in _per_category_columns(cfg)})


def _per_category(per_query: pd.DataFrame, cfg: EvaluateConfig) -> pd.DataFrame:
    value_cols = [c for c in per_query.columns if c in _value_columns(cfg.ks)]
    records = []
    for category, group in per_query.groupby(cfg.category_column, sort=True):
        values = {k: group[k].to_numpy() for k in value_cols}
        rec: dict[str, Any] = {cfg.category_column: category}
        rec.update(M.aggregate(values, group["n_relevant"].to_numpy()))
        records.append(rec)
    return pd.DataFrame(records).reindex(columns=_per_category_columns(cfg))


def _value_columns(ks: Sequence[int]) -> set[str]:
    names = {"ap", "ap_at_r", "r_precision"}
    for k in ks:
        names |= {f"hit_at_{k}", f"precision_at_{k}", f"recall_at_{k}"}
    return names
