"""Benchmark categorisation at scale: FAISS spherical k-means, assignment and the two-level tree.

Data: ``--n`` x ``--dim`` float32 unit vectors drawn around ``--true-clusters`` random centres
(random but clustered), made block by block in one preallocated array. It runs
:func:`imgsearch.categorize.clusters.cluster` (k-means++ seeding, training on at most
``--points-per-centroid * k`` points, assignment of every vector to its nearest centroid with
distance, confidence and outlier flag, Ward merge into ``--categories``) and prints the time of
each phase and peak memory: the process's peak RSS before clustering (the vectors) and after
(the vectors plus what clustering added). Also the ARI of the clusters against the planted
centres on a sample (a sanity check: the figures are of a clustering that works).

    python -m benchmarks.bench_categorize            # 1M x 512, target: < 2 min on 2 cores
    python -m benchmarks.bench_categorize --n 200000

Prints figures; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from imgsearch.categorize.clusters import ClusterConfig, cluster


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def clustered(
    n: int, dim: int, clusters: int, noise: float, seed: int, block: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, dim) float32 unit norm, planted cluster of each); memory: the vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, n)
    x = np.empty((n, dim), np.float32)
    scale = np.float32(noise / np.sqrt(dim))
    for start in range(0, n, block):
        rows = labels[start : start + block]
        part = centres[rows] + scale * rng.standard_normal((len(rows), dim), dtype=np.float32)
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        x[start : start + len(rows)] = part
    return x, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=1000, help="fine clusters")
    parser.add_argument("--categories", type=int, default=50)
    parser.add_argument("--true-clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.8, help="noise norm / centre norm")
    parser.add_argument("--points-per-centroid", type=int, default=64)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads; 0 = its default")
    args = parser.parse_args()

    t0 = time.perf_counter()
    x, planted = clustered(args.n, args.dim, args.true_clusters, args.noise, seed=0)
    ids = np.arange(args.n).astype(str)
    print(
        f"data: {x.shape} float32 = {x.nbytes / 1024**3:.2f} GB, {args.true_clusters} planted "
        f"clusters, made in {time.perf_counter() - t0:.1f} s; peak RSS {peak_rss_gb():.2f} GB"
    )
    cfg = ClusterConfig(
        k=args.k,
        n_categories=args.categories,
        niter=args.niter,
        max_points_per_centroid=args.points_per_centroid,
        threads=args.threads,
    )
    before = peak_rss_gb()
    t0 = time.perf_counter()
    res = cluster(ids, x, cfg)
    total = time.perf_counter() - t0
    after = peak_rss_gb()
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items())
    print(f"cluster(): {total:.1f} s ({phases})")
    print(
        f"peak RSS: {before:.2f} GB before, {after:.2f} GB after "
        f"(+{after - before:.2f} GB over data of {x.nbytes / 1024**3:.2f} GB)"
    )
    a = res.assignments
    sample = np.random.default_rng(1).choice(args.n, size=min(args.n, 100_000), replace=False)
    print(
        f"k={len(res.centroids)}, {len(res.category_centroids)} categories; "
        f"ARI vs planted (100k sample) {adjusted_rand_score(planted[sample], a['cluster_id'].to_numpy()[sample]):.3f}; "
        f"outliers {a['outlier'].mean():.3%}; mean confidence {a['confidence'].mean():.3f}"
    )


if __name__ == "__main__":
    main()
