"""Tuning ranking settings on validation queries, maximising mAP@k.

:func:`tune` grid-searches :class:`~imgsearch.search.ranking.RankingConfig` fields; relevant
means "same item" (and passing the filters), the query image itself is excluded. Average
precision is :func:`imgsearch.evaluate.metrics.average_precision_at_k`, the evaluation package's
one implementation. :func:`tune_on_split` runs it on one split's images as an exact gallery.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.errors import ConfigError
from imgsearch.evaluate import metrics as M
from imgsearch.search.factory import IndexConfig
from imgsearch.search.index import ImageIndex
from imgsearch.search.ranking import QUERY, RankingConfig, RankingTable, rank

log = logging.getLogger(__name__)


def _grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(grid[k] for k in keys))
    ]


def tune(
    index: ImageIndex,
    val_queries_emb: np.ndarray,
    val_query_items: Sequence[Any] | np.ndarray,
    grid: Mapping[str, Sequence[Any]] | None = None,
    *,
    base: RankingConfig | None = None,
    query_ids: Sequence[Any] | np.ndarray | None = None,
    k: int = 100,
) -> tuple[RankingConfig, pd.DataFrame]:
    """Grid-search ranking settings on validation queries, maximising mAP@k.

    index: the validation gallery; val_queries_emb (M, D) and val_query_items (M,): the queries
    and their items (relevant = a gallery row of the same item that passes the filters);
    query_ids (M,): the queries' own image ids, excluded from their results (pass them when the
    queries are gallery images). grid: RankingConfig field -> values (default ``base.tune_grid``);
    without usable popularity columns ``popularity_weight`` collapses to ``[0.0]``.
    Queries with no relevant row are skipped (counted in ``n_skipped``).
    Returns the best config (ties go to the earlier grid point) and a table with one row per
    grid point: the grid values, ``map``, ``hit_at_1``, ``recall_at_k``, ``n_queries``, ``n_skipped``.
    """
    base = base or RankingConfig()
    grid = dict(grid if grid is not None else base.tune_grid)
    fields = {f.name for f in dataclasses.fields(RankingConfig)} - {"tune_grid"}
    unknown = sorted(set(grid) - fields)
    if unknown or any(len(v) == 0 for v in grid.values()):
        raise ConfigError(f"tune: bad grid (unknown keys {unknown} or empty value lists)")
    table = RankingTable.from_index(index)
    if "popularity_weight" in grid and not table.popularity.any():
        grid["popularity_weight"] = [0.0]
    queries = np.ascontiguousarray(np.atleast_2d(val_queries_emb), dtype=np.float32)
    q_items = np.asarray([str(i) for i in val_query_items], dtype=object)
    if len(q_items) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(q_items)} query items")
    q_ids = None if query_ids is None else [str(i) for i in query_ids]
    if q_ids is not None and len(q_ids) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(q_ids)} query ids")
    exclusions = [[i] for i in q_ids] if q_ids is not None else None
    depth = max(1, min(int(k), index.count))

    rows = []
    configs = []
    for point in _grid_points(grid):
        cfg = dataclasses.replace(base, **point)
        configs.append(cfg)
        hits = rank(index, queries, depth, cfg, exclude_ids=exclusions, table=table)
        row = {key: (value if value is not None else np.nan) for key, value in point.items()}
        row.update(_score_point(table, cfg, hits, q_items, q_ids))
        rows.append(row)
        log.info("tune %s: mAP@%d %.4f", point, depth, row["map"])
    result = pd.DataFrame(rows)
    scores = result["map"].fillna(-np.inf).to_numpy()
    best = int(np.argmax(scores))  # first maximum: the earlier grid point wins ties
    result["best"] = np.arange(len(result)) == best
    return configs[best], result


def _score_point(
    table: RankingTable,
    cfg: RankingConfig,
    hits: pd.DataFrame,
    q_items: np.ndarray,
    q_ids: list[str] | None,
) -> dict[str, Any]:
    """mAP@k (:func:`imgsearch.evaluate.metrics.average_precision_at_k`), hit@1 and recall@k of
    one grid point's rankings; relevant = a gallery row of the query's item that passes the
    filters (not the query itself); queries without one are skipped."""
    allowed = table.allowed(cfg)
    by_query = {q: g for q, g in hits.groupby(QUERY, sort=False)}
    aps, top1, recalls, skipped = [], [], [], 0
    for j in range(len(q_items)):
        relevant_rows = allowed & (table.item_ids == q_items[j])
        if q_ids is not None:
            relevant_rows &= table.image_ids != q_ids[j]
        n_rel = int(relevant_rows.sum())
        if cfg.one_per_item:
            n_rel = min(n_rel, 1)
        if n_rel == 0:
            skipped += 1
            continue
        got = by_query.get(j)
        rel = (
            (got[schema.ITEM_ID].astype(str).to_numpy() == q_items[j])
            if got is not None
            else np.zeros(0, dtype=bool)
        )
        aps.append(M.average_precision_at_k(rel, n_rel))
        top1.append(bool(rel[:1].any()))
        recalls.append(rel.sum() / n_rel)
    return {
        "map": float(np.mean(aps)) if aps else float("nan"),
        "hit_at_1": float(np.mean(top1)) if top1 else float("nan"),
        "recall_at_k": float(np.mean(recalls)) if recalls else float("nan"),
        "n_queries": len(aps),
        "n_skipped": skipped,
    }


def tune_on_split(
    emb: np.ndarray,
    meta: pd.DataFrame,
    base: RankingConfig,
    extractor_fingerprint: str,
    split: str = "val",
    max_queries: int = 2000,
    seed: int = 0,
) -> tuple[RankingConfig, pd.DataFrame]:
    """Tune ``base`` on one split: its images form an exact (Flat) gallery and a seeded sample of
    at most ``max_queries`` of them query it (each query's own image excluded).

    ``emb`` (N, D) and ``meta`` (N rows, with ``split`` and ``item_id``) are aligned. Raises
    ``ValueError`` when the split has no rows.
    """
    if schema.SPLIT not in meta.columns or not (meta[schema.SPLIT] == split).any():
        raise ValueError(f"the manifest has no split=={split!r} rows to tune the ranking on")
    rows = (meta[schema.SPLIT] == split).to_numpy()
    gallery = ImageIndex.build(
        emb[rows], meta[rows], IndexConfig(factory="Flat"), extractor_fingerprint
    )
    pick = np.arange(gallery.count)
    if len(pick) > max_queries:
        pick = np.sort(np.random.default_rng(seed).choice(len(pick), max_queries, replace=False))
    return tune(
        gallery,
        emb[rows][pick],
        gallery.meta[schema.ITEM_ID].to_numpy()[pick],
        base=base,
        query_ids=gallery.meta[schema.IMAGE_ID].to_numpy()[pick],
        k=min(base.candidates, gallery.count),
    )
