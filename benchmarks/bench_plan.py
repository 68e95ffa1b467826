"""Benchmark: per-core figures on this machine, and the plan they give for 100M images.

Prints figures measured side by side in one run (never pass/fail), then the extrapolation:

1. Embedding throughput per core: :func:`imgsearch.embed.extract.extract` (the local engine every
   Spark partition also runs) from 320x240 JPEG files on disk, decode included, with 1 torch thread
   and no reader process (one core) and with every core; per backbone. Random-init weights cost
   the same FLOPs as pretrained ones.
2. The index the project would build for ``--target`` images
   (:func:`imgsearch.search.factory.choose_factory` with the default 4 GB budget: IVF-PQ), built
   here on ``--n`` clustered unit vectors of the served dimension: training time on the sample
   the builder takes (``IndexConfig.train_sample``), add throughput with 1 and with every FAISS
   thread, bytes per vector of the serialised index, recall@10 against exact search and latency at
   the ``nprobe`` the builder's tuner picks (:func:`imgsearch.search.measure.tune_and_measure`).
3. :func:`plan`: core-hours to embed, machines for a wall-time target, index memory, add and
   train time at the target size.

    python -m benchmarks.bench_plan                      # ~5-10 minutes on 2 cores
    python -m benchmarks.bench_plan --n 200000 --images 64 --backbones mobilenet_v2   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch

from benchmarks.bench_extract import make_images
from benchmarks.bench_index import clustered
from imgsearch.embed.extract import ExtractConfig, available_cores, extract
from imgsearch.models.backbones import create_extractor
from imgsearch.search.factory import IndexConfig, choose_factory
from imgsearch.search.index import ImageIndex, new_faiss_index, train_positions
from imgsearch.search.measure import query_positions, tune_and_measure


@dataclass(frozen=True)
class Plan:
    """What ``n_images`` cost, from per-core rates measured on one machine."""

    embed_core_hours: float
    embed_machines: int  # machines of ``cores_per_machine`` cores for ``wall_hours``
    index_gb: float  # codes + ids, coarse centroids and PQ codebooks
    add_hours: float  # on one machine of ``cores_per_machine`` cores
    train_minutes: float  # on one such machine, for the training sample


def plan(
    n_images: int,
    images_per_s_per_core: float,
    bytes_per_vector: float,
    nlist: int,
    dim: int,
    pq_m: int,
    add_per_s_per_core: float,
    train_s_measured: float,
    train_cores_measured: int,
    cores_per_machine: int = 16,
    wall_hours: float = 24.0,
    scaling: float = 0.8,
) -> Plan:
    """The 100M arithmetic. ``scaling``: the share of linear speed-up kept across cores and
    machines (embedding and adding are embarrassingly parallel; 0.8 leaves room for I/O).
    Training time does not grow with ``n_images`` (the sample is fixed); it shrinks with cores."""
    if min(n_images, images_per_s_per_core, add_per_s_per_core, cores_per_machine) <= 0:
        raise ValueError("plan: counts and rates must be > 0")
    core_hours = n_images / images_per_s_per_core / 3600.0
    machine_hours = core_hours / (cores_per_machine * scaling)
    coarse = nlist * dim * 4
    codebooks = pq_m * 256 * (dim // max(pq_m, 1)) * 4
    add_s = n_images / (add_per_s_per_core * cores_per_machine * scaling)
    train_s = train_s_measured * train_cores_measured / (cores_per_machine * scaling)
    return Plan(
        embed_core_hours=core_hours,
        embed_machines=max(1, math.ceil(machine_hours / wall_hours)),
        index_gb=(n_images * bytes_per_vector + coarse + codebooks) / 1e9,
        add_hours=add_s / 3600.0,
        train_minutes=train_s / 60.0,
    )


def pq_bytes(factory: str) -> int:
    """``m`` of ``...,PQ{m}`` (0 when the factory stores no PQ codes)."""
    part = factory.split(",")[-1]
    return int(part[2:].split("x")[0]) if part.startswith("PQ") else 0


def nlist_of(factory: str) -> int:
    first = factory.split(",")[0]
    return int(first[3:]) if first.startswith("IVF") else 0


def embed_rates(backbone: str, manifest: pd.DataFrame, batch: int, repeat: int) -> dict[str, float]:
    """images/s of the local engine on one core (1 thread, no reader) and on every core."""
    torch.manual_seed(0)
    ext = create_extractor(backbone, weights="none")
    cores = available_cores()
    settings = {
        "1 core": ExtractConfig(batch_size=batch, num_workers=0, threads=1),
        f"{cores} cores": ExtractConfig(batch_size=batch),
    }
    best: dict[str, float] = {}
    for _ in range(repeat):  # interleaved, best of
        for label, cfg in settings.items():
            res = extract(ext, manifest, cfg, progress=False)
            if res.metrics["n_failed"]:
                raise RuntimeError(f"benchmark images failed: {res.failures}")
            best[label] = max(best.get(label, 0.0), float(res.metrics["images_per_s"]))
    return best


def index_rates(emb: np.ndarray, factory: str, add_probe: int, seed: int) -> dict[str, float | str]:
    """Build ``factory`` on the vectors ``emb`` as the builder does; per-phase figures."""
    n, dim = emb.shape
    cfg = dataclasses.replace(IndexConfig(), factory=factory, seed=seed)
    index, _ = new_faiss_index(n, dim, cfg)
    cores = available_cores()
    pick = train_positions(n, cfg)
    sample = emb if pick is None else emb[pick]
    faiss.omp_set_num_threads(cores)
    t0 = time.perf_counter()
    index.train(sample)
    train_s = time.perf_counter() - t0
    out: dict[str, float | str] = {
        "factory": factory,
        "train_vectors": float(len(sample)),
        "train_s": train_s,
    }
    probe = emb[:add_probe]
    for threads in (1, cores):  # add rate on a clone of the trained, empty index
        faiss.omp_set_num_threads(threads)
        trial = faiss.clone_index(index)
        t0 = time.perf_counter()
        trial.add(probe)
        out[f"add_per_s_{threads}t"] = len(probe) / (time.perf_counter() - t0)
        del trial
    faiss.omp_set_num_threads(cores)
    empty_bytes = faiss.serialize_index(index).nbytes  # coarse centroids and codebooks
    t0 = time.perf_counter()
    for start in range(0, n, 100_000):
        index.add(emb[start : start + 100_000])
    out["add_all_s"] = time.perf_counter() - t0
    out["fixed_mb"] = empty_bytes / 2**20
    out["bytes_per_vector"] = float(faiss.serialize_index(index).nbytes - empty_bytes) / n
    meta = pd.DataFrame({"image_id": np.arange(n).astype(str), "item_id": np.arange(n).astype(str)})
    wrapped = ImageIndex(index, meta, factory=factory, extractor_fingerprint="bench")
    queries = emb[query_positions(n, cfg)]
    truth = faiss.knn(queries, emb, 10, faiss.METRIC_INNER_PRODUCT)[1]
    measured = tune_and_measure(wrapped, queries, truth, cfg)
    for key in ("recall_at_10_vs_exact", "latency_ms_p50", "latency_ms_p95", "nprobe"):
        if key in measured:
            out[key] = float(measured[key])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--images", type=int, default=128, help="JPEGs per embedding figure")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="interleaved runs, best kept")
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors the index is built on")
    parser.add_argument("--dim", type=int, default=128, help="served dimension (demo: 128)")
    parser.add_argument("--add-probe", type=int, default=100_000)
    parser.add_argument("--target", type=int, default=100_000_000)
    parser.add_argument("--cores-per-machine", type=int, default=16)
    parser.add_argument("--wall-hours", type=float, default=24.0)
    parser.add_argument(
        "--also", nargs="*", default=["IVF8192,PQ64"], help="factories measured beside the auto one"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cores = available_cores()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"plan benchmark, {time.strftime('%Y-%m-%d')}: {cores} cores ({cpu}), torch {torch.__version__}"
    )
    print(
        f"faiss {faiss.__version__}; load average at start {Path('/proc/loadavg').read_text().split()[:3]}\n"
    )

    rates: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_images(Path(tmp) / "images", args.images)
        print(
            f"1. embedding, local engine, {args.images} JPEGs 320x240 decoded + resized + embedded:"
        )
        for backbone in args.backbones:
            rates[backbone] = embed_rates(backbone, manifest, args.batch_size, args.repeat)
            one, every = rates[backbone]["1 core"], rates[backbone][f"{cores} cores"]
            print(
                f"   {backbone:<14} 1 core {one:7.2f} images/s   {cores} cores {every:7.2f} images/s"
                f"   (x{every / one:.2f} for x{cores} cores)"
            )

    auto = choose_factory(args.target, args.dim)
    print(
        f"\n2. index for {args.target:,} vectors of {args.dim}-d (auto: {auto}), built here on {args.n:,}:"
    )
    emb = clustered(args.n, args.dim, clusters=max(100, args.n // 1000), noise=1.5, seed=args.seed)
    built = {f: index_rates(emb, f, args.add_probe, args.seed) for f in [auto, *args.also]}
    del emb
    keys = [k for k in next(iter(built.values())) if k != "factory"]
    print(f"   {'':<24}" + "".join(f"{f:>16}" for f in built))
    for key in keys:
        print(
            f"   {key:<24}"
            + "".join(f"{float(r.get(key, float('nan'))):16,.3f}" for r in built.values())
        )
    idx = built[auto]
    add_1t = float(idx["add_per_s_1t"])
    print(
        f"   add scaling ({auto}) x{float(idx[f'add_per_s_{cores}t']) / add_1t:.2f} for x{cores} threads"
    )

    print(
        f"\n3. plan for {args.target:,} images on machines of {args.cores_per_machine} cores"
        f" ({args.wall_hours:g} h target; 80% of linear scaling assumed):"
    )
    for backbone, r in rates.items():
        p = plan(
            args.target,
            r["1 core"],
            float(idx["bytes_per_vector"]),
            nlist_of(auto),
            args.dim,
            pq_bytes(auto),
            add_1t,
            float(idx["train_s"]),
            cores,
            args.cores_per_machine,
            args.wall_hours,
        )
        print(
            f"   {backbone:<14} embed {p.embed_core_hours:9,.0f} core-hours -> {p.embed_machines} machines"
        )
    for factory, built_idx in built.items():
        p = plan(
            args.target,
            1.0,
            float(built_idx["bytes_per_vector"]),
            nlist_of(factory),
            args.dim,
            pq_bytes(factory),
            float(built_idx["add_per_s_1t"]),
            float(built_idx["train_s"]),
            cores,
            args.cores_per_machine,
            args.wall_hours,
        )
        print(
            f"   {factory:<14} index {p.index_gb:.1f} GB, add {p.add_hours:.2f} h,"
            f" train {p.train_minutes:.1f} min on one machine;"
            f" recall@10 {float(built_idx.get('recall_at_10_vs_exact', float('nan'))):.3f}"
            f" at nprobe {float(built_idx.get('nprobe', float('nan'))):.0f}"
        )


if __name__ == "__main__":
    main()
