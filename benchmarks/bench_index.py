"""Benchmark the auto-chosen FAISS index on clustered, L2-normalised vectors.

Data: ``--clusters`` Gaussian clusters in ``--dim`` dimensions (centres uniform on the sphere,
isotropic noise of total norm ``--noise`` relative to a unit centre, so two points of a cluster
have cosine ~ 1 / (1 + noise^2)), normalised, generated in chunks. For each ``--n`` it builds the
index ``imgsearch.search.measure.build_index`` picks (factory "auto", search parameters tuned to the target
recall), then prints build time, recall@10 against exact search (``faiss.IndexFlatIP`` on
``--queries`` sample queries), latency per single query, and QPS at batch 1 and 1000.

    python benchmarks/bench_index.py --n 100000 1000000 --queries 500

Prints figures; never passes or fails on time. Target: recall@10 >= 0.95 at <= 1 ms/query at 1M.
"""

from __future__ import annotations

import argparse
import logging
import time

import faiss
import numpy as np
import pandas as pd

from imgsearch.search.factory import IndexConfig
from imgsearch.search.measure import build_index

CHUNK = 100_000


def clustered(n: int, dim: int, clusters: int, noise: float, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random unit centres, float32, made chunk by chunk."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    faiss.normalize_L2(centres)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        labels = rng.integers(0, clusters, stop - start)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block *= noise / np.sqrt(dim)
        block += centres[labels]
        faiss.normalize_L2(block)
        out[start:stop] = block
    return out


def run_one(n: int, args: argparse.Namespace) -> dict[str, object]:
    t0 = time.perf_counter()
    emb = clustered(n, args.dim, args.clusters, args.noise, args.seed)
    gen_s = time.perf_counter() - t0
    meta = pd.DataFrame({"image_id": np.arange(n).astype(str), "item_id": np.arange(n).astype(str)})
    cfg = IndexConfig(
        factory=args.factory,
        eval_queries=args.queries,
        target_recall=args.target_recall,
        memory_budget_mb=args.memory_budget_mb,
    )
    _, metrics = build_index(emb, meta, cfg, extractor_fingerprint="bench")
    metrics["n"] = n
    metrics["gen_s"] = gen_s
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.5)
    parser.add_argument(
        "--queries", type=int, default=500, help="sample queries (half tune, half report)"
    )
    parser.add_argument("--factory", default="auto")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--memory-budget-mb", type=float, default=4096.0)
    parser.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rows = []
    for n in args.n:
        metrics = run_one(n, args)
        print(
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()},
            flush=True,
        )
        rows.append(metrics)
    table = pd.DataFrame(rows).set_index("n")
    cols = [
        "factory",
        "nprobe",
        "ef_search",
        "build_s",
        "tune_s",
        "recall_at_10_vs_exact",
        "latency_ms_p50",
        "latency_ms_p95",
        "latency_ms_mean",
        "qps_batch1",
        "qps_batch1000",
    ]
    table = table[[c for c in cols if c in table.columns]]
    print(
        f"\nthreads={faiss.omp_get_max_threads()} dim={args.dim} clusters={args.clusters} noise={args.noise}"
    )
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.T.to_string(float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
