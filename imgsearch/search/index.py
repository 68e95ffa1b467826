"""FAISS index over L2-normalised image embeddings, with its metadata, checksums and atomic publishing.

An :class:`ImageIndex` pairs a FAISS index with a metadata table: row ``i`` of ``meta`` is FAISS
id ``i`` (ids are positional; :meth:`ImageIndex.add` appends). Vectors are L2-normalised float32,
so with ``metric="ip"`` a score is the cosine similarity. Scores returned by :meth:`ImageIndex.search`
are always "higher is better": with ``metric="l2"`` the squared distance ``d`` is turned into the
cosine ``1 - d / 2`` (exact for unit vectors).

On disk an index is a directory::

    index.faiss    faiss.write_index output
    meta.parquet   the metadata table
    index.json     sha256 of both files, extractor fingerprint, factory, dim, count, metric, search params

:meth:`ImageIndex.load` reads the bytes, checks their sha256 against ``index.json`` and only then
hands them to FAISS (``faiss.deserialize_index``) and pandas, so a tampered file is refused before a
parser sees it (RELIABILITY 8). :func:`publish_index` writes a new version next to the old ones and
moves a ``CURRENT`` pointer with one ``os.replace`` (RELIABILITY 9).

Factory choice (:func:`choose_factory`): ``Flat`` (exact) up to ``flat_max`` vectors; above, an
inverted file ``IVF{nlist}`` with ``nlist`` the power of two nearest ``sqrt(n)`` (cells of about
``sqrt(n)`` vectors: cheap k-means training and a small coarse search), storing the vectors
``Flat`` when they fit the memory budget, else ``SQ8`` (4x smaller), else ``PQ{m}``. Search
parameters (``nprobe`` / ``efSearch``) left unset are tuned at build time: doubled until
recall@10 against exact search reaches ``target_recall`` on sample queries drawn from the data.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from imgsearch import schema
from imgsearch.errors import ConfigError, ExtractorMismatchError, IndexIntegrityError
from imgsearch.paths import atomic_writer, fsync_dir

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "meta.parquet"
INFO_FILE = "index.json"
CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
FORMAT_VERSION = 1

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_ADD_CHUNK = 100_000
_NORM_TOLERANCE = 1e-2


@dataclass
class IndexConfig:
    """How to build an index.

    factory: a FAISS factory string (``"Flat"``, ``"IVF1024,Flat"``, ``"HNSW32,Flat"``, ...) or
        ``"auto"`` for :func:`choose_factory`.
    metric: ``"ip"`` (inner product = cosine on unit vectors) or ``"l2"``.
    nprobe / ef_search: search parameters of IVF / HNSW indexes; ``None`` tunes them at build time
        to reach ``target_recall`` (recall@10 vs exact) on ``eval_queries`` sample queries.
    train_sample: at most this many vectors train an index that needs training (IVF, PQ, SQ).
    memory_budget_mb: what the stored vectors may take; drives the auto choice of Flat/SQ8/PQ.
    flat_max: up to this many vectors ``auto`` picks exact search.
    max_nprobe / max_ef_search: upper bounds of the tuning.
    seed: for sampling training vectors and evaluation queries.
    """

    factory: str = "auto"
    metric: str = "ip"
    nprobe: int | None = None
    ef_search: int | None = None
    target_recall: float = 0.95
    eval_queries: int = 500
    train_sample: int = 100_000
    memory_budget_mb: float = 4096.0
    flat_max: int = 50_000
    max_nprobe: int = 256
    max_ef_search: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in _METRICS:
            raise ConfigError(
                f"IndexConfig.metric must be one of {sorted(_METRICS)}, got {self.metric!r}"
            )
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(
                f"IndexConfig.target_recall must be in (0, 1], got {self.target_recall}"
            )
        for name in ("nprobe", "ef_search"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ConfigError(f"IndexConfig.{name} must be >= 1 or null, got {value}")
        if self.eval_queries < 1 or self.train_sample < 1 or self.flat_max < 0:
            raise ConfigError(
                "IndexConfig: eval_queries and train_sample must be >= 1, flat_max >= 0"
            )


def _nearest_pow2(x: float) -> int:
    return int(2 ** round(math.log2(max(x, 1.0))))


def choose_factory(n: int, d: int, memory_budget_mb: float = 4096.0, flat_max: int = 50_000) -> str:
    """The FAISS factory string for ``n`` vectors of dimension ``d`` (rule in the module docstring).

    >>> choose_factory(10_000, 512)
    'Flat'
    >>> choose_factory(1_000_000, 512)
    'IVF1024,Flat'
    >>> choose_factory(1_000_000, 512, memory_budget_mb=1024)
    'IVF1024,SQ8'
    """
    if n < 0 or d < 1:
        raise ValueError(f"choose_factory: need n >= 0 and d >= 1, got n={n}, d={d}")
    if n <= flat_max:
        return "Flat"
    nlist = max(16, _nearest_pow2(math.sqrt(n)))
    budget = memory_budget_mb * 2**20
    if n * d * 4 <= budget:
        return f"IVF{nlist},Flat"
    if n * d <= budget:
        return f"IVF{nlist},SQ8"
    # PQ: m bytes per vector; the largest divisor of d (<= d/2, so at least 2 dims per sub-quantiser)
    # that fits the budget, at least one byte per vector.
    m_fit = max(1, int(budget // max(n, 1)))
    divisors = [m for m in range(1, d // 2 + 1) if d % m == 0 and m <= m_fit]
    m = max(divisors) if divisors else 1
    return f"IVF{nlist},PQ{m}"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_embeddings(emb: np.ndarray, dim: int | None = None) -> np.ndarray:
    arr = np.ascontiguousarray(emb, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"embeddings have dimension {arr.shape[1]}, the index has {dim}")
    if not np.isfinite(arr).all():
        raise ValueError("embeddings contain NaN or inf")
    if len(arr):
        norms = np.linalg.norm(arr, axis=1)
        bad = np.abs(norms - 1.0) > _NORM_TOLERANCE
        if bad.any():
            raise ValueError(
                f"embeddings must be L2-normalised: {int(bad.sum())} rows have norms off 1 "
                f"(e.g. {float(norms[bad][0]):.4f})"
            )
    return arr


def _check_meta(meta: pd.DataFrame, n: int) -> pd.DataFrame:
    missing = [c for c in (schema.IMAGE_ID, schema.ITEM_ID) if c not in meta.columns]
    if missing:
        raise ValueError(f"index metadata lacks columns {missing}")
    if len(meta) != n:
        raise ValueError(f"metadata has {len(meta)} rows for {n} embeddings")
    if meta[schema.IMAGE_ID].duplicated().any():
        dup = meta.loc[meta[schema.IMAGE_ID].duplicated(), schema.IMAGE_ID].iloc[0]
        raise ValueError(f"duplicate image_id in index metadata: {dup!r}")
    return meta.reset_index(drop=True)


class ImageIndex:
    """A FAISS index plus its metadata (row ``i`` = FAISS id ``i``).

    Build with :meth:`build` (or :func:`build_index` for metrics), query with :meth:`search`,
    append with :meth:`add`, persist with :meth:`save` / :meth:`load`.
    """

    def __init__(
        self,
        index: faiss.Index,
        meta: pd.DataFrame,
        *,
        factory: str,
        metric: str = "ip",
        extractor_fingerprint: str | None = None,
        search_params: dict[str, int] | None = None,
    ) -> None:
        if metric not in _METRICS:
            raise ConfigError(f"metric must be one of {sorted(_METRICS)}, got {metric!r}")
        if index.metric_type != _METRICS[metric]:
            raise ValueError(f"FAISS index metric {index.metric_type} does not match {metric!r}")
        self.index = index
        self.meta = _check_meta(meta, int(index.ntotal))
        self.factory = factory
        self.metric = metric
        self.extractor_fingerprint = extractor_fingerprint
        self.search_params: dict[str, int] = {}
        self._cache: dict[str, Any] = {}
        self.set_search_params(**(search_params or {}))

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        emb: np.ndarray,
        meta: pd.DataFrame,
        cfg: IndexConfig | None = None,
        extractor_fingerprint: str | None = None,
    ) -> ImageIndex:
        """Train (when the factory needs it) and fill an index with ``emb`` (N, D) and ``meta`` (N rows).

        Search parameters are set from ``cfg`` when given (tuning is :func:`build_index`'s job).
        Raises ValueError on bad shapes, non-normalised vectors or duplicate image ids.
        """
        cfg = cfg or IndexConfig()
        arr = _check_embeddings(emb)
        meta = _check_meta(meta, len(arr))
        n, d = arr.shape
        factory = (
            choose_factory(n, d, cfg.memory_budget_mb, cfg.flat_max)
            if cfg.factory == "auto"
            else cfg.factory
        )
        if "IDMap" in factory:
            raise ConfigError(f"factory {factory!r}: ids are positional, IDMap is not supported")
        try:
            index = faiss.index_factory(d, factory, _METRICS[cfg.metric])
        except RuntimeError as exc:
            raise ConfigError(f"bad FAISS factory string {factory!r}: {exc}") from exc
        if not index.is_trained:
            if n == 0:
                raise ValueError(f"factory {factory!r} needs training vectors; got none")
            rng = np.random.default_rng(cfg.seed)
            sample = arr
            if n > cfg.train_sample:
                sample = arr[np.sort(rng.choice(n, cfg.train_sample, replace=False))]
            log.info("training %s on %d vectors", factory, len(sample))
            index.train(sample)
        out = cls(
            index,
            meta.iloc[:0],
            factory=factory,
            metric=cfg.metric,
            extractor_fingerprint=extractor_fingerprint,
        )
        out._add_vectors(arr)
        out.meta = meta
        params = {"nprobe": cfg.nprobe, "ef_search": cfg.ef_search}
        out.set_search_params(**{k: int(v) for k, v in params.items() if v is not None})
        return out

    def _add_vectors(self, arr: np.ndarray) -> None:
        chunks = range(0, len(arr), _ADD_CHUNK)
        for start in tqdm(chunks, desc="index add", unit="chunk", disable=len(chunks) < 3):
            self.index.add(arr[start : start + _ADD_CHUNK])

    def add(self, emb: np.ndarray, meta: pd.DataFrame) -> None:
        """Append vectors (new FAISS ids ``count .. count+len-1``) and their metadata rows.

        Image ids must stay unique across the whole index. An IVF index keeps its trained
        centroids (retrain by rebuilding when the data moved far).
        """
        arr = _check_embeddings(emb, self.dim)
        meta = _check_meta(meta, len(arr))
        clash = set(meta[schema.IMAGE_ID]) & set(self.meta[schema.IMAGE_ID])
        if clash:
            raise ValueError(f"image ids already in the index: {sorted(clash)[:5]}")
        if not len(arr):
            return
        combined = pd.concat([self.meta, meta], ignore_index=True)
        self._add_vectors(arr)
        self.meta = combined
        self._cache.clear()

    # --- properties and parameters -----------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def __len__(self) -> int:
        return self.count

    def _ivf(self) -> Any | None:
        try:
            return faiss.extract_index_ivf(self.index)
        except RuntimeError:
            return None

    def _hnsw(self) -> Any | None:
        return self.index if hasattr(self.index, "hnsw") else None

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set ``nprobe`` (IVF) / ``ef_search`` (HNSW); a parameter the index has not is ignored."""
        space = faiss.ParameterSpace()
        if nprobe is not None and self._ivf() is not None:
            space.set_index_parameter(self.index, "nprobe", int(nprobe))
            self.search_params["nprobe"] = int(nprobe)
        if ef_search is not None and self._hnsw() is not None:
            space.set_index_parameter(self.index, "efSearch", int(ef_search))
            self.search_params["ef_search"] = int(ef_search)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """A value derived from the metadata, computed once (cleared by :meth:`add`)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    # --- queries -----------------------------------------------------------------------------
    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of each query: ``(scores (M, k) float32, positions (M, k) int64)``.

        ``q`` is (M, D) or (D,) float32, L2-normalised like the index. Scores are higher-is-better
        (cosine); missing results (fewer than ``k`` reachable vectors) have position -1 and
        score -inf.
        """
        arr = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"queries must be (M, {self.dim}), got shape {np.shape(q)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.count == 0 or len(arr) == 0:
            return (
                np.full((len(arr), k), -np.inf, dtype=np.float32),
                np.full((len(arr), k), -1, dtype=np.int64),
            )
        scores, positions = self.index.search(arr, k)
        scores = scores.astype(np.float32, copy=False)
        if self.metric == "l2":
            scores = 1.0 - scores / 2.0
        scores[positions < 0] = -np.inf
        return scores, positions.astype(np.int64, copy=False)

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """The stored vectors at ``positions`` (approximate for SQ/PQ storage), shape (len, D)."""
        pos = np.asarray(positions, dtype=np.int64).ravel()
        if len(pos) and (pos.min() < 0 or pos.max() >= self.count):
            raise IndexError(f"positions out of range [0, {self.count})")
        ivf = self._ivf()
        if ivf is not None and not self._cache.get("_direct_map"):
            ivf.make_direct_map()
            self._cache["_direct_map"] = True
        if not len(pos):
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.index.reconstruct_batch(pos), dtype=np.float32)

    # --- persistence -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "factory": self.factory,
            "metric": self.metric,
            "dim": self.dim,
            "count": self.count,
            "extractor_fingerprint": self.extractor_fingerprint,
            "search_params": dict(self.search_params),
        }

    def save(self, directory: Path | str) -> Path:
        """Write ``index.faiss``, ``meta.parquet`` and ``index.json`` (with their sha256) into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(out / INDEX_FILE))
        self.meta.to_parquet(out / META_FILE, index=False)
        info = self.info()
        info["sha256"] = {
            INDEX_FILE: _sha256_file(out / INDEX_FILE),
            META_FILE: _sha256_file(out / META_FILE),
        }
        (out / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        return out

    @classmethod
    def load(
        cls, directory: Path | str, expected_extractor_fingerprint: str | None = None
    ) -> ImageIndex:
        """Load a saved index, verifying checksums before any parser reads the files.

        Raises IndexIntegrityError (missing file, bad index.json, sha256 mismatch, inconsistent
        counts) and ExtractorMismatchError (``expected_extractor_fingerprint`` given and different).
        """
        src = Path(directory)
        info = read_info(src)
        if (
            expected_extractor_fingerprint is not None
            and info.get("extractor_fingerprint") != expected_extractor_fingerprint
        ):
            raise ExtractorMismatchError(
                f"index at {src} was built with extractor {info.get('extractor_fingerprint')!r}, "
                f"not {expected_extractor_fingerprint!r}"
            )
        # read once, hash the bytes in memory, and parse those same bytes: no window between
        # the check and the read in which the file could change
        blobs = {}
        for name in (INDEX_FILE, META_FILE):
            try:
                data = (src / name).read_bytes()
            except OSError as exc:
                raise IndexIntegrityError(f"cannot read {src / name}: {exc}") from exc
            if _sha256_bytes(data) != info["sha256"].get(name):
                raise IndexIntegrityError(f"{src / name}: sha256 does not match index.json")
            blobs[name] = data
        index = faiss.deserialize_index(np.frombuffer(blobs[INDEX_FILE], dtype=np.uint8))
        meta = pd.read_parquet(io.BytesIO(blobs[META_FILE]))
        if (
            int(index.ntotal) != info["count"]
            or len(meta) != info["count"]
            or index.d != info["dim"]
        ):
            raise IndexIntegrityError(f"{src}: count/dim of the files disagree with index.json")
        return cls(
            index,
            meta,
            factory=str(info["factory"]),
            metric=str(info["metric"]),
            extractor_fingerprint=info.get("extractor_fingerprint"),
            search_params=dict(info.get("search_params") or {}),
        )


def read_info(directory: Path | str) -> dict[str, Any]:
    """``index.json`` of a saved index, checked for the keys :meth:`ImageIndex.load` relies on."""
    path = Path(directory) / INFO_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexIntegrityError(f"cannot read {path}: {exc}") from exc
    required = ("sha256", "factory", "metric", "dim", "count")
    if not isinstance(info, dict) or any(k not in info for k in required):
        raise IndexIntegrityError(f"{path} lacks one of {required}")
    if not isinstance(info["sha256"], dict):
        raise IndexIntegrityError(f"{path}: sha256 must be a mapping")
    return info


def verify_dir(directory: Path | str) -> dict[str, Any]:
    """Check the sha256 of a saved index's files against its ``index.json``; returns the info."""
    src = Path(directory)
    info = read_info(src)
    for name in (INDEX_FILE, META_FILE):
        try:
            digest = _sha256_file(src / name)
        except OSError as exc:
            raise IndexIntegrityError(f"cannot read {src / name}: {exc}") from exc
        if digest != info["sha256"].get(name):
            raise IndexIntegrityError(f"{src / name}: sha256 does not match index.json")
    return info


# --- build with measurements ---------------------------------------------------------------------
def _recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ignoring -1 padding of ``truth``)."""
    hits, total = 0, 0
    for f, t in zip(found, truth, strict=True):
        t = t[t >= 0]
        hits += len(np.intersect1d(f[f >= 0], t))
        total += len(t)
    return hits / total if total else 1.0


def exact_neighbours(emb: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions of the exact top-``k`` inner-product neighbours, (M, k).

    ``faiss.knn`` with ``METRIC_INNER_PRODUCT``: the brute force ``IndexFlatIP`` runs, without
    copying the database into an index (2 GB saved at 1M x 512).
    """
    _, positions = faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(emb, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return np.asarray(positions, dtype=np.int64)


def _tune(
    index: ImageIndex,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int,
    name: str,
    start: int,
    maximum: int,
    target: float,
) -> int:
    """A small value of search parameter ``name`` reaching ``target`` recall (or ``maximum``).

    Doubles from ``start`` until the target is met, then bisects between the last failing and
    the first passing value (three steps: within 1/8 of the interval).
    """

    def recall_with(value: int) -> float:
        index.set_search_params(**{name: value})
        recall = _recall_at(index.search(queries, k)[1], truth)
        log.info("tuning %s=%d: recall@%d %.4f", name, value, k, recall)
        return recall

    low, value = 0, start
    while not (passed := recall_with(value) >= target) and value < maximum:
        low, value = value, min(value * 2, maximum)
    high = value
    for _ in range(3 if passed else 0):
        if high - low <= 1 or low == 0:
            break
        mid = (low + high) // 2
        if recall_with(mid) >= target:
            high = mid
        else:
            low = mid
    index.set_search_params(**{name: high})
    return high


def measure(
    index: ImageIndex, queries: np.ndarray, truth: np.ndarray, k: int = 10
) -> dict[str, float]:
    """Recall@k vs ``truth``, single-query latency (p50/p95 ms) and QPS at batch 1 and 1000."""
    metrics: dict[str, float] = {}
    metrics[f"recall_at_{k}_vs_exact"] = _recall_at(index.search(queries, k)[1], truth)
    times = []
    for row in queries:
        t0 = time.perf_counter()
        index.search(row[None, :], k)
        times.append(time.perf_counter() - t0)
    lat = np.asarray(times) * 1000.0
    metrics["latency_ms_p50"] = float(np.percentile(lat, 50))
    metrics["latency_ms_p95"] = float(np.percentile(lat, 95))
    metrics["latency_ms_mean"] = float(lat.mean())
    metrics["qps_batch1"] = float(len(lat) / max(lat.sum() / 1000.0, 1e-12))
    batch = np.resize(queries, (1000, queries.shape[1])) if len(queries) else queries
    t0 = time.perf_counter()
    index.search(batch, k)
    metrics["qps_batch1000"] = float(len(batch) / max(time.perf_counter() - t0, 1e-12))
    return metrics


def build_index(
    emb: np.ndarray,
    meta: pd.DataFrame,
    cfg: IndexConfig | None = None,
    extractor_fingerprint: str | None = None,
) -> tuple[ImageIndex, dict[str, Any]]:
    """Build an index and measure it against exact search.

    Sample queries are drawn from ``emb`` (``cfg.eval_queries`` of them); their exact top-10
    comes from ``faiss.IndexFlatIP``. Unset search parameters are tuned on one half of the
    sample, and the reported recall/latency are measured on the other half.
    Returns ``(index, metrics)``; metrics: build_s, train/add time included, tune_s,
    recall_at_10_vs_exact, latency_ms_p50/p95/mean, qps_batch1, qps_batch1000, count, dim,
    factory (str), nprobe / ef_search when relevant.
    """
    cfg = cfg or IndexConfig()
    arr = _check_embeddings(emb)
    t0 = time.perf_counter()
    index = ImageIndex.build(arr, meta, cfg, extractor_fingerprint)
    metrics: dict[str, Any] = {
        "build_s": time.perf_counter() - t0,
        "count": index.count,
        "dim": index.dim,
        "factory": index.factory,
    }
    if index.count == 0:
        return index, metrics
    k = min(10, index.count)
    rng = np.random.default_rng(cfg.seed + 1)
    n_q = min(cfg.eval_queries, index.count)
    pick = rng.choice(index.count, n_q, replace=False)
    queries = arr[pick]
    truth = exact_neighbours(arr, queries, k)
    tune_q, tune_t = queries, truth
    eval_q, eval_t = queries, truth
    if n_q >= 20:  # tune on one half, report on the other
        half = n_q // 2
        tune_q, tune_t, eval_q, eval_t = queries[:half], truth[:half], queries[half:], truth[half:]
    t1 = time.perf_counter()
    if index._ivf() is not None and cfg.nprobe is None:
        index.set_search_params(
            nprobe=_tune(index, tune_q, tune_t, k, "nprobe", 1, cfg.max_nprobe, cfg.target_recall)
        )
    if index._hnsw() is not None and cfg.ef_search is None:
        index.set_search_params(
            ef_search=_tune(
                index, tune_q, tune_t, k, "ef_search", 16, cfg.max_ef_search, cfg.target_recall
            )
        )
    metrics["tune_s"] = time.perf_counter() - t1
    measured = measure(index, eval_q, eval_t, k)
    if k != 10:  # tiny index: report under the usual name, the figure is recall@count
        measured["recall_at_10_vs_exact"] = measured.pop(f"recall_at_{k}_vs_exact")
    metrics.update(measured)
    metrics.update(index.search_params)
    if metrics["recall_at_10_vs_exact"] < cfg.target_recall:
        log.warning(
            "index %s reaches recall@10 %.3f < target %.3f (search params %s)",
            index.factory,
            metrics["recall_at_10_vs_exact"],
            cfg.target_recall,
            index.search_params,
        )
    return index, metrics


# --- atomic publishing ---------------------------------------------------------------------------
def _fsync_tree(path: Path) -> None:
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def set_current(root: Path | str, version_dir: Path | str) -> None:
    """Point ``root/CURRENT`` at ``version_dir`` (inside ``root/versions``) in one atomic step.

    The pointer is written to a temporary file, fsynced, then ``os.replace``d: readers see the
    old or the new pointer, never a partial one. Also the way to roll back to an older version.
    """
    root = Path(root)
    target = Path(version_dir).resolve()
    versions = (root / VERSIONS_DIR).resolve()
    if target.parent != versions:
        raise ValueError(f"{version_dir} is not a version directory of {root}")
    verify_dir(target)
    with atomic_writer(root / CURRENT_FILE) as fh:
        fh.write(f"{VERSIONS_DIR}/{target.name}\n".encode())


def publish_index(index: ImageIndex, root: Path | str) -> Path:
    """Publish ``index`` under ``root`` atomically and return its version directory.

    Writes into ``root/versions/.tmp-<uuid>``, fsyncs, renames it to
    ``root/versions/<UTC time>-<uuid>``, re-verifies the checksums, then moves ``CURRENT`` with
    :func:`set_current`. A crash before that last ``os.replace`` leaves the old index current
    (a stray ``.tmp-*`` directory at worst, ignored by readers).
    """
    root = Path(root)
    versions = root / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = versions / f".tmp-{token}"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    final = versions / f"{stamp}-{token}"
    try:
        index.save(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(versions)
    set_current(root, final)
    log.info("published index %s (%d vectors) at %s", index.factory, index.count, final)
    return final


def current_version(root: Path | str) -> Path:
    """The version directory ``root/CURRENT`` points at (refuses pointers leaving ``root/versions``)."""
    root = Path(root)
    try:
        text = (root / CURRENT_FILE).read_text().strip()
    except OSError as exc:
        raise IndexIntegrityError(f"no published index under {root}: {exc}") from exc
    versions = (root / VERSIONS_DIR).resolve()
    target = (root / text).resolve()
    if target.parent != versions or target.name.startswith("."):
        raise IndexIntegrityError(f"{root / CURRENT_FILE} points outside {versions}: {text!r}")
    return target


def current_index(
    root: Path | str, expected_extractor_fingerprint: str | None = None
) -> ImageIndex:
    """Load the index ``root/CURRENT`` points at (checksums verified by :meth:`ImageIndex.load`)."""
    return ImageIndex.load(current_version(root), expected_extractor_fingerprint)


def refresh_current(
    root: Path | str,
    serving: ImageIndex | None,
    expected_extractor_fingerprint: str | None = None,
) -> ImageIndex:
    """Load the current index, or keep ``serving`` when the current one is refused.

    For a server that reloads on a schedule: a tampered or mismatched new version raises inside,
    is logged as an error, and the index already in memory keeps serving. With nothing serving
    yet the error propagates.
    """
    try:
        return current_index(root, expected_extractor_fingerprint)
    except (IndexIntegrityError, ExtractorMismatchError) as exc:
        if serving is None:
            raise
        log.error("refused the current index under %s, keeping the serving one: %s", root, exc)
        return serving


#: Manifest columns not carried into an index's metadata (local cache paths).
NON_META_COLUMNS = (schema.PRE_PATH,)


def gallery_meta(ids: np.ndarray, manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows of the embedded images ``ids``, in embedding order (index metadata).

    Raises ``ValueError`` when an embedded image is not in the manifest.
    """
    table = manifest.drop(columns=[c for c in NON_META_COLUMNS if c in manifest.columns])
    table = table.assign(**{schema.IMAGE_ID: table[schema.IMAGE_ID].astype(str)})
    table = table.drop_duplicates(schema.IMAGE_ID).set_index(schema.IMAGE_ID)
    missing = [i for i in ids if i not in table.index]
    if missing:
        raise ValueError(
            f"{len(missing)} embedded images are not in the manifest, e.g. {missing[:3]}"
        )
    return table.loc[[str(i) for i in ids]].reset_index()
