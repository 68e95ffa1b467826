"""Benchmark the drift verdict: the fast path (imgsearch.monitor.drift) vs Evidently's default report.

Data: ``--n`` reference and ``--n`` current L2-normalised vectors in ``--dim`` dimensions drawn from
``--clusters`` Gaussian clusters; the current set over-samples one cluster (``--grow``: its weight
relative to the others; 1.0 = no drift). It times

- Evidently 0.7's ``Report([EmbeddingsDrift(...)])`` with its default method (``model``; the
  report also fits a t-SNE of up to 2 x 2,500 rows for its plot),
- :func:`imgsearch.monitor.drift.drift_verdict` with the same method and threshold (the fast path),
- the fast path with ``--extra-methods`` (for the record),

checks that both verdicts agree and prints times and the speed-up ratio. Target: >= 4x.

    python -m benchmarks.bench_drift --n 5000 --dim 512

Prints figures; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from imgsearch.monitor.drift import drift_verdict
from monitoring.drift import evidently_report


def clustered(n: int, dim: int, clusters: int, grow: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = np.ones(clusters)
    weights[0] = grow
    labels = rng.choice(clusters, size=n, p=weights / weights.sum())
    x = centres[labels] + rng.normal(scale=0.7 / np.sqrt(dim), size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=20)
    parser.add_argument("--grow", type=float, default=1.5)
    parser.add_argument("--extra-methods", nargs="*", default=["mmd", "distance"])
    args = parser.parse_args()

    ref = clustered(args.n, args.dim, args.clusters, 1.0, seed=1)
    cur = clustered(args.n, args.dim, args.clusters, args.grow, seed=2)
    print(f"reference {ref.shape}, current {cur.shape}, cluster 0 weight x{args.grow}")

    t0 = time.perf_counter()
    fast = drift_verdict(ref, cur, "model")
    t_fast = time.perf_counter() - t0
    print(f"fast path (model):        {t_fast:8.2f} s  score {fast.score:.4f}  drift {fast.drift}")

    _html, score, detected, t_ev = evidently_report(ref, cur, None)
    print(f"Evidently default report: {t_ev:8.2f} s  score {score:.4f}  drift {detected}")
    print(f"same verdict: {detected == fast.drift}   speed-up: {t_ev / t_fast:.1f}x")

    for method in args.extra_methods:
        t0 = time.perf_counter()
        res = drift_verdict(ref, cur, method)
        print(
            f"fast path ({method}): {time.perf_counter() - t0:8.2f} s  score {res.score:.5g}"
            f"  drift {res.drift} (Evidently's default threshold {res.threshold})"
        )


if __name__ == "__main__":
    main()
