"""Clusters of an unlabelled collection: FAISS spherical k-means, merged into a two-level tree.

1. Fine clusters: ``faiss.Kmeans(spherical=True)`` on the L2-normalised embeddings (cosine
   geometry), trained on at most ``max_points_per_centroid * k`` points (FAISS samples them).
   ``k`` comes from the config, or when it is ``None`` from :func:`choose_k`. Centroids start
   from scikit-learn's k-means++ seeding on at most ``8 * k`` of those points (FAISS's own
   random start left two centroids in one planted cluster and one across two, ARI 0.79 in the
   tests; k-means++ spreads them out), ``init: random`` keeps FAISS's.
2. Top level: the fine centroids are merged into ``n_categories`` categories by scikit-learn's
   ``AgglomerativeClustering`` (Ward linkage on the unit centroids, where Euclidean distance is
   a monotone function of cosine), so similar clusters share a parent. On the demo (400 emoji,
   k=56 -> 10) Ward matched average linkage's NMI against the true category (0.30 vs 0.29) with
   a better ARI (0.18 vs 0.13) and without average linkage's one giant category (881 of 1577).
3. Assignment, batch by batch (memory stays the vectors plus ``batch * k``): each image's nearest
   centroid, its cosine distance ``1 - cos``, a confidence ``(d2 - d1) / (d1 + d2)`` in [0, 1]
   (1 on the centroid, 0 half-way to the second-nearest centroid: the margin, scaled), and an
   outlier flag: distance above the cluster's ``median + outlier_mads * 1.4826 * MAD`` (a robust
   z-score within the cluster, so a loose cluster does not flag all its members), or a member of
   a cluster smaller than ``min_cluster_size`` (k-means++ seeds far points, which can then keep
   a centroid of their own).

:func:`choose_k`, the documented criterion: the candidates are ``k_grid`` multiples of
``sqrt(N / 2)`` (the usual rule of thumb), and the one with the best cosine silhouette on a
seeded sample of at most ``k_sample`` images wins (ties: the smaller k).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
import pandas as pd
from sklearn.cluster import AgglomerativeClustering, kmeans_plusplus
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from imgsearch import schema
from imgsearch.errors import ConfigError

log = logging.getLogger(__name__)

ASSIGNMENT_COLUMNS = (
    schema.IMAGE_ID,
    "cluster_id",
    "category_id",
    "distance",
    "confidence",
    "outlier",
)


@dataclass(frozen=True)
class ClusterConfig:
    """Settings of :func:`cluster` (``configs/categorize.yaml``, section ``clusters``)."""

    k: int | None = None  # fine clusters; None = choose_k
    n_categories: int = 10  # top-level categories (clipped to k)
    niter: int = 20
    nredo: int = 1
    seed: int = 0
    max_points_per_centroid: int = 256  # FAISS trains on at most this many points per centroid
    k_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # choose_k: multiples of sqrt(N / 2)
    k_sample: int = 5000  # choose_k: silhouette on at most this many images
    outlier_mads: float = 3.0
    min_cluster_size: int = 3  # members of smaller clusters are outliers
    batch: int = 65536  # assignment batch (rows)
    init: str = "kmeans++"  # kmeans++ | random (FAISS's own)
    n_representatives: int = 8
    threads: int = 0  # FAISS OpenMP threads; 0 = its default


@dataclass
class Clustering:
    """What :func:`cluster` learns: centroids of both levels and the per-image assignments."""

    centroids: np.ndarray  # (k, D) float32, unit norm
    parent: np.ndarray  # (k,) category of each fine cluster
    category_centroids: np.ndarray  # (n_categories, D) float32, unit norm
    assignments: pd.DataFrame  # ASSIGNMENT_COLUMNS, one row per image, input order
    k_scores: dict[int, float] = field(default_factory=dict)  # choose_k's silhouettes
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: choose_k, train, ...


def normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (a new float32 array; zero rows stay zero)."""
    out = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def _check(emb: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(emb, dtype=np.float32)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"expected embeddings (N >= 2, D), got shape {x.shape}")
    if not np.isfinite(x[: min(len(x), 10_000)]).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return x


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def kmeans(x: np.ndarray, k: int, cfg: ClusterConfig) -> np.ndarray:
    """Unit-norm centroids ``(k, D)`` of spherical k-means on the (normalised) rows of ``x``."""
    if not 1 <= k <= len(x):
        raise ConfigError(f"k={k} clusters for {len(x)} images: need 1 <= k <= N")
    train = normalised(x[_sample(len(x), k * cfg.max_points_per_centroid, cfg.seed)])
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=cfg.niter,
        nredo=cfg.nredo,
        seed=cfg.seed,
        spherical=True,
        verbose=False,
        max_points_per_centroid=cfg.max_points_per_centroid,
        min_points_per_centroid=1,
    )
    init = None
    if cfg.init == "kmeans++":
        seeds = train[_sample(len(train), 8 * k, cfg.seed + 1)]
        # many small BLAS calls: multi-threaded BLAS made them ~9x slower on 2 busy cores
        with threadpool_limits(limits=1, user_api="blas"):
            init, _ = kmeans_plusplus(seeds, k, random_state=cfg.seed)
    elif cfg.init != "random":
        raise ConfigError(f"clusters.init {cfg.init!r}: expected kmeans++ or random")
    km.train(train, init_centroids=init)
    if km.centroids is None:
        raise RuntimeError("faiss.Kmeans trained no centroids")
    return normalised(km.centroids)


def nearest_two(
    x: np.ndarray, centroids: np.ndarray, batch: int = 65536
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: nearest centroid, cosine similarity to it and to the second nearest (or -1)."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    depth = min(2, len(centroids))
    labels = np.empty(len(x), np.int64)
    sim1 = np.empty(len(x), np.float32)
    sim2 = np.full(len(x), -1.0, np.float32)
    for start in range(0, len(x), batch):
        block = normalised(x[start : start + batch])
        sims, ids = index.search(block, depth)
        stop = start + len(block)
        labels[start:stop], sim1[start:stop] = ids[:, 0], sims[:, 0]
        if depth == 2:
            sim2[start:stop] = sims[:, 1]
    return labels, sim1, sim2


def choose_k(x: np.ndarray, cfg: ClusterConfig) -> tuple[int, dict[int, float]]:
    """The module docstring's criterion: best silhouette among ``k_grid * sqrt(N / 2)``."""
    n = len(x)
    base = math.sqrt(n / 2)
    grid = sorted({min(max(2, round(f * base)), n - 1) for f in cfg.k_grid})
    idx = _sample(n, cfg.k_sample, cfg.seed)
    sample = normalised(x[idx])
    scores: dict[int, float] = {}
    for k in grid:
        labels, _, _ = nearest_two(sample, kmeans(x, k, cfg))
        n_used = len(np.unique(labels))
        scores[k] = (
            float(silhouette_score(sample, labels, metric="cosine"))
            if 2 <= n_used < len(sample)
            else -1.0
        )
    best = max(grid, key=lambda k: (scores[k], -k))
    log.info("choose_k: silhouettes %s -> k=%d", scores, best)
    return best, scores


def merge(centroids: np.ndarray, n_categories: int) -> np.ndarray:
    """Category of each fine centroid: Ward agglomeration of the unit centroids."""
    k = len(centroids)
    n = min(max(1, n_categories), k)
    if n == k:
        return np.arange(k)
    if n == 1:
        return np.zeros(k, np.int64)
    model = AgglomerativeClustering(n_clusters=n, linkage="ward")
    return np.asarray(model.fit_predict(centroids), dtype=np.int64)


def category_centroids(centroids: np.ndarray, parent: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Size-weighted mean of each category's fine centroids, unit norm."""
    n = int(parent.max()) + 1
    out = np.zeros((n, centroids.shape[1]), np.float32)
    np.add.at(out, parent, centroids * sizes[:, None].astype(np.float32))
    return normalised(out)


def outliers(
    cluster: np.ndarray, distance: np.ndarray, n_mads: float, min_size: int = 1
) -> np.ndarray:
    """Distance above the cluster's median + ``n_mads`` robust standard deviations (MAD), or a
    member of a cluster with fewer than ``min_size`` members."""
    frame = pd.DataFrame({"c": cluster, "d": distance})
    median = frame.groupby("c")["d"].transform("median")
    mad = (frame["d"] - median).abs().groupby(frame["c"]).transform("median")
    far = (frame["d"] > median + n_mads * 1.4826 * mad).to_numpy() & (mad > 0).to_numpy()
    small = np.bincount(cluster)[cluster] < min_size
    return far | small


def cluster(
    image_ids: np.ndarray | list[str], emb: np.ndarray, cfg: ClusterConfig | None = None
) -> Clustering:
    """Fine clusters, categories and per-image assignments (see the module docstring).

    Raises ``ValueError`` on a non-2-D, too small or non-finite ``emb``, or ids of another
    length; :class:`ConfigError` on a ``k`` out of range.
    """
    cfg = cfg or ClusterConfig()
    if cfg.threads > 0:
        faiss.omp_set_num_threads(cfg.threads)
    x = _check(emb)
    if len(image_ids) != len(x):
        raise ValueError(f"{len(image_ids)} image ids for {len(x)} embeddings")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    k_scores: dict[int, float] = {}
    k = cfg.k
    if k is None:
        k, k_scores = choose_k(x, cfg)
        seconds["choose_k"], clock = time.perf_counter() - clock, time.perf_counter()
    centroids = kmeans(x, k, cfg)
    seconds["train"], clock = time.perf_counter() - clock, time.perf_counter()
    labels, sim1, sim2 = nearest_two(x, centroids, cfg.batch)
    seconds["assign"], clock = time.perf_counter() - clock, time.perf_counter()
    parent = merge(centroids, cfg.n_categories)
    seconds["merge"], clock = time.perf_counter() - clock, time.perf_counter()
    sizes = np.bincount(labels, minlength=k)
    d1 = np.clip(1.0 - sim1, 0.0, 2.0)
    d2 = np.clip(1.0 - sim2, 0.0, 2.0)
    total = d1 + d2
    confidence = np.divide(d2 - d1, total, out=np.ones_like(total), where=total > 0)
    assignments = pd.DataFrame(
        {
            schema.IMAGE_ID: np.asarray([str(i) for i in image_ids], dtype=object),
            "cluster_id": labels,
            "category_id": parent[labels],
            "distance": d1,
            "confidence": confidence,
            "outlier": outliers(labels, d1, cfg.outlier_mads, cfg.min_cluster_size),
        }
    )
    seconds["table"] = time.perf_counter() - clock
    return Clustering(
        centroids,
        parent,
        category_centroids(centroids, parent, sizes),
        assignments,
        k_scores,
        seconds,
    )


def representatives(assignments: pd.DataFrame, column: str, n: int) -> dict[int, list[str]]:
    """Per group of ``column``: up to ``n`` image ids nearest their centroid, outliers last."""
    ranked = assignments.sort_values(
        [column, "outlier", "distance", schema.IMAGE_ID], kind="stable"
    )
    heads = ranked.groupby(column, sort=True).head(n)
    return {int(g): list(rows[schema.IMAGE_ID]) for g, rows in heads.groupby(column, sort=True)}
