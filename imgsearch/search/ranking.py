"""Ranking on top of the index: filters, popularity, diversity (MMR), one image per item, tuning.

For a query, :func:`rank` fetches ``candidates`` nearest neighbours from the index, drops the
ones the filters refuse (``exclude_nsfw``, ``categories``, ``exclude_ids``; when too few survive
it fetches more, up to every row, with an exact scan of the allowed rows as the last resort),
then scores each survivor::

    score = similarity + popularity_weight * popularity

``similarity`` is the cosine from the index; ``popularity`` in [0, 1] is the mean of
``log1p(downloads)`` and ``log1p(likes)``, each min-max normalised over the index's metadata
(missing values count 0; a column that is absent, all-missing or constant is left out, and with
none left popularity is 0, so ``score == similarity`` exactly).

``one_per_item`` keeps the best-scored image of each item. ``mmr_lambda`` re-orders the survivors
by maximal marginal relevance (Carbonell & Goldstein, SIGIR 1998)::

    next = argmax_{d not in S}  lambda * score(d) - (1 - lambda) * max_{s in S} cos(d, s)

on the stored candidate vectors; ``mmr_lambda = 1`` is pure relevance (the same order as
``None``), smaller values trade relevance for diversity.

:func:`imgsearch.search.tuning.tune` grid-searches these settings on validation queries; MMR
itself is :func:`imgsearch.search.rerank.mmr`. A :class:`RankingTable` holds what ranking derives
from an index's metadata (str ids, popularity, filter masks), built once by whoever holds the index.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.errors import ConfigError
from imgsearch.search.index import ImageIndex
from imgsearch.search.rerank import mmr

log = logging.getLogger(__name__)

POPULARITY_COLUMNS = (schema.DOWNLOADS, schema.LIKES)
QUERY = "query"
RANK = "rank"
SCORE = "score"
SIMILARITY = "similarity"
POPULARITY = "popularity"
#: Leading columns of :func:`rank`'s output (``query`` and ``rank`` only for 2-D queries).
RESULT_COLUMNS = (QUERY, RANK, schema.IMAGE_ID, schema.ITEM_ID, SCORE, SIMILARITY, POPULARITY)
_EXACT_CHUNK = 65_536


def _default_grid() -> dict[str, list[Any]]:
    return {"popularity_weight": [0.0, 0.02, 0.05, 0.1, 0.2, 0.5], "mmr_lambda": [None]}


@dataclass
class RankingConfig:
    """How search results are filtered and ordered (see the module docstring).

    popularity_weight: weight of popularity (in [0, 1]) added to the cosine similarity.
    exclude_nsfw: drop rows whose ``nsfw`` is true (rows with an unknown value are kept).
    categories: keep only rows whose ``category_column`` is one of these (``None``: all).
    mmr_lambda: ``None`` for no MMR; in [0, 1], 1.0 = pure relevance.
    one_per_item: at most one image (the best) per item.
    candidates: neighbours fetched from the index before re-ranking (at least ``k``).
    category_column: the metadata column ``categories`` filters on.
    tune_grid: what :func:`tune` searches when given no grid: RankingConfig field -> values.
    """

    popularity_weight: float = 0.0
    exclude_nsfw: bool = False
    categories: list[str] | None = None
    mmr_lambda: float | None = None
    one_per_item: bool = False
    candidates: int = 100
    category_column: str = schema.CATEGORY
    tune_grid: dict[str, list[Any]] = field(default_factory=_default_grid)

    def __post_init__(self) -> None:
        if not np.isfinite(self.popularity_weight) or self.popularity_weight < 0:
            raise ConfigError(
                f"popularity_weight must be finite and >= 0, got {self.popularity_weight}"
            )
        if self.mmr_lambda is not None and not 0.0 <= float(self.mmr_lambda) <= 1.0:
            raise ConfigError(f"mmr_lambda must be in [0, 1] or null, got {self.mmr_lambda}")
        if int(self.candidates) < 1:
            raise ConfigError(f"candidates must be >= 1, got {self.candidates}")
        if isinstance(self.categories, str):
            self.categories = [self.categories]
        names = {f.name for f in dataclasses.fields(self)} - {"tune_grid"}
        unknown = sorted(set(self.tune_grid or {}) - names)
        if unknown:
            raise ConfigError(f"tune_grid: unknown RankingConfig fields {unknown}")


# --- per-row signals ----------------------------------------------------------------------------
def popularity(meta: pd.DataFrame) -> np.ndarray:
    """Popularity in [0, 1] per row (module docstring); zeros when no popularity column is usable."""
    parts = []
    for column in POPULARITY_COLUMNS:
        if column not in meta.columns:
            continue
        values = pd.to_numeric(meta[column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        values = np.log1p(np.clip(values, 0.0, None))
        if np.isnan(values).all():
            continue
        low, high = np.nanmin(values), np.nanmax(values)
        if high <= low:
            continue
        parts.append(np.nan_to_num((values - low) / (high - low), nan=0.0))
    if not parts:
        return np.zeros(len(meta), dtype=np.float64)
    return np.mean(parts, axis=0)


def allowed_mask(meta: pd.DataFrame, cfg: RankingConfig) -> np.ndarray:
    """Boolean mask of the rows the filters of ``cfg`` keep.

    Raises ConfigError when ``categories`` is set and the index has no ``category_column``.
    """
    mask = np.ones(len(meta), dtype=bool)
    if cfg.exclude_nsfw and schema.NSFW in meta.columns:
        mask &= ~schema.parse_flags(meta[schema.NSFW]).fillna(False).to_numpy(dtype=bool)
    if cfg.categories is not None:
        if cfg.category_column not in meta.columns:
            raise ConfigError(
                f"cannot filter on categories: the index has no {cfg.category_column!r} column"
            )
        wanted = {str(c) for c in cfg.categories}
        mask &= (
            meta[cfg.category_column]
            .astype("string")
            .isin(wanted)
            .fillna(False)
            .to_numpy(dtype=bool)
        )
    return mask


@dataclass
class RankingTable:
    """What ranking derives from an index's metadata, computed once and held beside the index.

    Build it with :meth:`from_index` when the index is loaded (or after :meth:`ImageIndex.add`)
    and pass it to every :func:`rank` call: the str id columns and popularity are computed here
    once, and the filter mask of each filter setting on first use. A table is tied to the
    metadata it was built from; :func:`rank` refuses one built for another index state.
    """

    meta: pd.DataFrame
    image_ids: np.ndarray  # (N,) str
    item_ids: np.ndarray  # (N,) str
    popularity: np.ndarray  # (N,) float64 in [0, 1]
    _masks: dict[tuple[Any, ...], np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_index(cls, index: ImageIndex) -> RankingTable:
        meta = index.meta
        return cls(
            meta=meta,
            image_ids=meta[schema.IMAGE_ID].astype(str).to_numpy(),
            item_ids=meta[schema.ITEM_ID].astype(str).to_numpy(),
            popularity=np.asarray(popularity(meta)),
        )

    def allowed(self, cfg: RankingConfig) -> np.ndarray:
        """:func:`allowed_mask` of ``cfg``'s filters, computed once per filter setting."""
        key = (
            cfg.exclude_nsfw,
            cfg.category_column,
            None if cfg.categories is None else tuple(sorted(map(str, cfg.categories))),
        )
        if key not in self._masks:
            self._masks[key] = allowed_mask(self.meta, cfg)
        return self._masks[key]


def _table_for(index: ImageIndex, table: RankingTable | None) -> RankingTable:
    if table is None:
        return RankingTable.from_index(index)
    if table.meta is not index.meta:
        raise ValueError("the ranking table was built for another index state (rebuild it)")
    return table


# --- candidate retrieval with filters ----------------------------------------------------------
def _exclusions(exclude_ids: Any, n_queries: int, per_query_ok: bool) -> list[frozenset[str]]:
    """One set of excluded image ids per query, from None, ids, or (2-D queries) one list per query."""
    if exclude_ids is None:
        return [frozenset()] * n_queries
    if isinstance(exclude_ids, str):
        return [frozenset({exclude_ids})] * n_queries
    items = list(exclude_ids)
    nested = [not isinstance(x, str) and isinstance(x, Iterable) for x in items]
    if items and all(nested):
        if not per_query_ok or len(items) != n_queries:
            raise ValueError(f"exclude_ids: {len(items)} per-query lists for {n_queries} queries")
        return [frozenset(str(i) for i in x) for x in items]
    if any(nested):
        raise ValueError("exclude_ids: mix of ids and lists of ids")
    return [frozenset(str(i) for i in items)] * n_queries


def _survivors(positions: np.ndarray, items: np.ndarray, one_per_item: bool) -> int:
    return len(pd.unique(items[positions])) if one_per_item else len(positions)


def _exact_allowed(
    index: ImageIndex, query: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of ``query`` with every row where ``keep``, by a chunked scan of stored vectors."""
    rows = np.flatnonzero(keep)
    sims = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), _EXACT_CHUNK):
        block = rows[start : start + _EXACT_CHUNK]
        sims[start : start + len(block)] = index.vectors(block) @ query
    order = np.argsort(-sims, kind="stable")
    return rows[order], sims[order]


def _candidates(
    index: ImageIndex,
    table: RankingTable,
    queries: np.ndarray,
    k: int,
    cfg: RankingConfig,
    exclusions: list[frozenset[str]],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, (positions, similarities) of allowed, non-excluded rows, best first.

    Asks the index for ``candidates`` neighbours, then 4x more while fewer than ``k`` survive
    the filters and rows remain; when the index cannot return more (an IVF probes only some
    cells) it scans the allowed rows exactly.
    """
    n = index.count
    image_ids, items, allowed = table.image_ids, table.item_ids, table.allowed(cfg)
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(queries)
    pending = list(range(len(queries)))
    fetch = min(max(int(cfg.candidates), k), n)
    while pending and n:
        scores, positions = index.search(queries[pending], fetch)
        still: list[int] = []
        for row, j in enumerate(pending):
            valid = positions[row] >= 0
            pos, sim = positions[row][valid], scores[row][valid]
            keep = allowed[pos]
            if exclusions[j]:
                keep &= ~np.isin(image_ids[pos], list(exclusions[j]))
            pos, sim = pos[keep], sim[keep]
            if _survivors(pos, items, cfg.one_per_item) >= k or fetch >= n and valid.all():
                out[j] = (pos, sim)
            elif valid.sum() < fetch or fetch >= n:
                # the index returned all it can reach: scan the allowed rows exactly
                mask = allowed.copy()
                if exclusions[j]:
                    mask &= ~np.isin(image_ids, list(exclusions[j]))
                out[j] = _exact_allowed(index, queries[j], mask)
            else:
                still.append(j)
        pending = still
        fetch = min(fetch * 4, n)
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
    return [o if o is not None else empty for o in out]


# --- rank ----------------------------------------------------------------------------------------
def _order(
    index: ImageIndex,
    table: RankingTable,
    pos: np.ndarray,
    sim: np.ndarray,
    k: int,
    cfg: RankingConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pop = table.popularity[pos] if len(pos) else np.zeros(0)
    score = sim.astype(np.float64) + cfg.popularity_weight * pop
    order = np.lexsort((pos, -sim, -score))  # score desc, then similarity desc, then position
    pos, sim, pop, score = pos[order], sim[order], pop[order], score[order]
    if cfg.one_per_item and len(pos):
        items = table.item_ids[pos]
        first = ~pd.Series(items).duplicated().to_numpy()
        pos, sim, pop, score = pos[first], sim[first], pop[first], score[first]
    pool = max(int(cfg.candidates), k)
    pos, sim, pop, score = pos[:pool], sim[:pool], pop[:pool], score[:pool]
    if cfg.mmr_lambda is not None and len(pos):
        pick = mmr(score, index.vectors(pos), k, float(cfg.mmr_lambda))
    else:
        pick = np.arange(min(k, len(pos)))
    return pos[pick], sim[pick], pop[pick], score[pick]


def rank(
    index: ImageIndex,
    query_emb: np.ndarray,
    k: int,
    cfg: RankingConfig | None = None,
    exclude_ids: Iterable[str] | Sequence[Iterable[str]] | None = None,
    *,
    table: RankingTable | None = None,
) -> pd.DataFrame:
    """The top-``k`` gallery rows for each query, filtered and re-ranked by ``cfg``.

    query_emb: (D,) for one query or (M, D), L2-normalised float32 from the index's extractor.
    exclude_ids: image ids never returned: one collection for every query, or (2-D queries) a
        sequence of M collections, one per query.
    table: the index's :class:`RankingTable` (built here when not given: pass one when ranking
        many times against the same index). Raises ValueError when it belongs to another index.
    Returns one row per hit, best first: for 2-D queries columns ``query`` (0-based row of
    ``query_emb``) and ``rank`` (1-based) lead; for a 1-D query they are left out (the rows are
    in rank order). Then ``image_id, item_id, score, similarity, popularity`` and the index's
    other metadata columns. Fewer than ``k`` rows when fewer rows pass the filters.
    """
    cfg = cfg or RankingConfig()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    single = np.ndim(query_emb) == 1
    queries = np.ascontiguousarray(np.atleast_2d(query_emb), dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.dim:
        raise ValueError(
            f"queries must be (D,) or (M, D) with D={index.dim}, got {np.shape(query_emb)}"
        )
    exclusions = _exclusions(exclude_ids, len(queries), per_query_ok=not single)
    table = _table_for(index, table)
    found = _candidates(index, table, queries, k, cfg, exclusions)

    frames = []
    for j, (pos, sim) in enumerate(found):
        pos, sim, pop, score = _order(index, table, pos, sim, k, cfg)
        frame = pd.DataFrame(
            {
                QUERY: np.full(len(pos), j, dtype=np.int64),
                RANK: np.arange(1, len(pos) + 1, dtype=np.int64),
                "_pos": pos,
                SCORE: score,
                SIMILARITY: sim.astype(np.float64),
                POPULARITY: pop.astype(np.float64),
            }
        )
        frames.append(frame)
    empty = pd.DataFrame(
        {QUERY: [], RANK: [], "_pos": [], SCORE: [], SIMILARITY: [], POPULARITY: []}
    ).astype({QUERY: np.int64, RANK: np.int64, "_pos": np.int64})
    hits = pd.concat(frames, ignore_index=True) if frames else empty
    meta = index.meta.iloc[hits["_pos"].to_numpy()].reset_index(drop=True)
    out = pd.concat([hits.drop(columns="_pos"), meta], axis=1)
    leading = [c for c in RESULT_COLUMNS if c in out.columns]
    out = out[leading + [c for c in out.columns if c not in leading]]
    if single:
        out = out.drop(columns=[QUERY, RANK])
    return out
