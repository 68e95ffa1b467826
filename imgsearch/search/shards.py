"""Build an index from sharded embeddings without holding every vector twice (autofaiss's way).

:func:`build_index` (:mod:`imgsearch.search.measure`) takes one ``(N, D)`` array, and a Flat or
IVF index copies it: twice the vectors in memory. :func:`build_index_from_shards` reads an
embeddings file or folder of shards (:mod:`imgsearch.embed.files`) in passes, never more than one
shard plus two small samples in memory beside the index:

1. the Parquet footers give ``N`` and ``D``, hence the factory (:func:`~imgsearch.search.index.new_faiss_index`);
2. one pass collects the training sample (the same seeded positions as :meth:`ImageIndex.build`)
   and the query sample (the same as :func:`~imgsearch.search.measure.build_index`), and trains;
3. one pass adds shard by shard;
4. one pass computes the queries' exact top-10, shard by shard, merged across shards;

then search parameters are tuned and recall@10 vs exact measured as for one array
(:func:`~imgsearch.search.measure.tune_and_measure`). On the same vectors the result is the index
:func:`~imgsearch.search.measure.build_index` makes, with the same metrics; save and publish it
as any other (:meth:`ImageIndex.save`, :func:`imgsearch.search.publish.publish_index`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from imgsearch.embed.files import count_embeddings, iter_shards, shard_paths
from imgsearch.search.factory import IndexConfig
from imgsearch.search.index import (
    ImageIndex,
    check_embeddings,
    gallery_meta,
    new_faiss_index,
    train_positions,
)
from imgsearch.search.measure import query_positions, tune_and_measure

log = logging.getLogger(__name__)


def _rows_at(path: Path, positions: np.ndarray, dim: int) -> np.ndarray:
    """The vectors at sorted-or-not global ``positions``, gathered in one pass over the shards."""
    out = np.empty((len(positions), dim), dtype=np.float32)
    order = np.argsort(positions)
    sorted_pos = positions[order]
    start = 0
    for _, emb in iter_shards(path):
        lo, hi = np.searchsorted(sorted_pos, [start, start + len(emb)])
        out[order[lo:hi]] = emb[sorted_pos[lo:hi] - start]
        start += len(emb)
    return out


def exact_neighbours_sharded(path: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Global positions of the exact top-``k`` inner-product neighbours of ``queries`` over every
    shard of ``path``: each shard's top-``k`` (``faiss.knn``), merged, (M, k)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_pos = np.zeros((len(queries), 0), dtype=np.int64)
    start = 0
    for _, emb in iter_shards(path):
        if len(emb):
            kk = min(k, len(emb))
            scores, pos = faiss.knn(
                queries, np.ascontiguousarray(emb), kk, faiss.METRIC_INNER_PRODUCT
            )
            best_scores = np.concatenate([best_scores, scores], axis=1)
            best_pos = np.concatenate([best_pos, pos + start], axis=1)
            # a stable sort on (-score) keeps the lower position first among ties, as one scan does
            keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
            best_scores = np.take_along_axis(best_scores, keep, axis=1)
            best_pos = np.take_along_axis(best_pos, keep, axis=1)
        start += len(emb)
    return best_pos


def build_index_from_shards(
    path: Path,
    manifest: pd.DataFrame,
    cfg: IndexConfig | None = None,
    extractor_fingerprint: str | None = None,
) -> tuple[ImageIndex, dict[str, Any]]:
    """Build and measure an index over the embeddings at ``path`` (file or folder of shards).

    ``manifest`` gives the metadata of the embedded images (:func:`gallery_meta`). Returns
    ``(index, metrics)`` with the metrics of :func:`~imgsearch.search.measure.build_index` plus
    ``shards``. Raises ``ValueError`` on non-normalised vectors, duplicate ids or an image missing
    from the manifest; ``FileNotFoundError`` when there are no embeddings at ``path``.
    """
    cfg = cfg or IndexConfig()
    n, d = count_embeddings(path)
    t0 = time.perf_counter()
    index, factory = new_faiss_index(n, d, cfg)
    if not index.is_trained:
        if n == 0:
            raise ValueError(f"factory {factory!r} needs training vectors; got none")
        pick = train_positions(n, cfg)
        sample = _rows_at(path, np.arange(n) if pick is None else pick, d)
        log.info("training %s on %d vectors (from shards)", factory, len(sample))
        index.train(check_embeddings(sample, d))
        del sample
    ids = []
    shards = shard_paths(path)
    for shard_ids, emb in tqdm(
        iter_shards(path), total=len(shards), desc="index add", unit="shard"
    ):
        index.add(check_embeddings(emb, d))
        ids.append(shard_ids)
    all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=object)
    out = ImageIndex(
        index,
        gallery_meta(all_ids, manifest),
        factory=factory,
        metric=cfg.metric,
        extractor_fingerprint=extractor_fingerprint,
    )
    out.set_search_params(
        **{
            k: int(v)
            for k, v in {"nprobe": cfg.nprobe, "ef_search": cfg.ef_search}.items()
            if v is not None
        }
    )
    metrics: dict[str, Any] = {
        "build_s": time.perf_counter() - t0,
        "count": out.count,
        "dim": out.dim,
        "factory": out.factory,
        "shards": len(shards),
    }
    if out.count == 0:
        return out, metrics
    k = min(10, out.count)
    queries = _rows_at(path, query_positions(out.count, cfg), d)
    truth = exact_neighbours_sharded(path, queries, k)
    metrics.update(tune_and_measure(out, queries, truth, cfg))
    return out, metrics


def select_embeddings(path: Path, keep: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Only the rows of ``path`` whose image id is in ``keep`` (one shard in memory at a time)."""
    parts = [
        (ids[mask], emb[mask])
        for ids, emb in iter_shards(path)
        if (mask := np.fromiter((i in keep for i in ids), bool, len(ids))).any()
    ]
    if not parts:
        _, d = count_embeddings(path)
        return np.zeros(0, dtype=object), np.zeros((0, d), dtype=np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
