"""Benchmark: single-query search latency end to end, in-process through the index pyfunc.

One query = ``IndexModel.predict`` on a one-row DataFrame holding a base64 JPEG: base64 decode +
safe image decode and normalisation + preprocessing + CNN forward + FAISS search + ranking
(popularity, filters) + the output table. Measured for each backbone on the same gallery and
the same queries, p50 / p95 printed side by side (never pass/fail).

Targets on 2 cores: p50 <= 50 ms (MobileNetV2), <= 100 ms (ResNet50).

    python -m benchmarks.bench_serving                     # mobilenet_v2 and resnet50, ~1 min
    python -m benchmarks.bench_serving --n-gallery 20000 --queries 100 --threads 2

Thread count matters more than the backbone on a shared machine: with more runnable processes
than cores, OpenMP's spinning workers wait for each other at every layer (measured: MobileNetV2
40 ms with 1 thread vs 2 s with 2 at load average 6 on 2 cores). Both settings are printed.

Random-init weights (``weights=none``) are as fast as pretrained ones. The gallery vectors are
random unit vectors (search time depends on their number and dimension, not their values).
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from imgsearch.backbones import create_extractor, fingerprint, save_extractor
from imgsearch.index import ImageIndex, IndexConfig
from imgsearch.ranking import RankingConfig
from registry import models
from registry.register import MODEL_CODE

BACKBONES = ("mobilenet_v2", "resnet50")
TARGET_P50_MS = {"mobilenet_v2": 50.0, "resnet50": 100.0}


def query_jpegs(n: int, width: int = 320, height: int = 240) -> list[str]:
    """``n`` distinct camera-sized JPEG queries, base64-encoded as a client would send them."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.ellipse([x0, y0, x0 + 40, y0 + 30], fill=fill)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def build_model(backbone: str, n_gallery: int, root: Path) -> Path:
    """A saved (not registered) index pyfunc: extractor + Flat index of random unit vectors."""
    ext = create_extractor(backbone, weights="none")
    ext_dir = root / backbone / "extractor"
    save_extractor(ext, ext_dir)
    dim = int(ext.spec.embedding_dim)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n_gallery, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    meta = pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(n_gallery)],
            "item_id": [f"item{i // 4}" for i in range(n_gallery)],
            "item_name": [f"thing {i // 4}" for i in range(n_gallery)],
            "category": [f"cat{i % 8}" for i in range(n_gallery)],
            "downloads": rng.integers(0, 10_000, n_gallery),
            "likes": rng.integers(0, 1_000, n_gallery),
        }
    )
    index = ImageIndex.build(emb, meta, IndexConfig(factory="auto"), fingerprint(ext))
    index_dir = root / backbone / "index"
    index.save(index_dir)
    model_dir = root / backbone / "model"
    mlflow.pyfunc.save_model(  # as the register step logs it: models-from-code + params schema
        str(model_dir),
        python_model=str(MODEL_CODE / "index_model.py"),
        artifacts={models.ARTIFACT_EXTRACTOR: str(ext_dir), models.ARTIFACT_INDEX: str(index_dir)},
        signature=models.index_signature(RankingConfig()),
        pip_requirements=["mlflow"],
        model_config={"allow_paths": False},
    )
    return model_dir


def time_queries(
    model: object, queries: list[str], params: dict[str, object], warmup: int
) -> list[float]:
    predict = model.predict  # type: ignore[attr-defined]
    for q in queries[:warmup]:
        predict(pd.DataFrame({"image": [q]}), params=params)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        out = predict(pd.DataFrame({"image": [q]}), params=params)
        times.append((time.perf_counter() - t0) * 1000.0)
        assert len(out) == params["k"], out
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--n-gallery", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--popularity-weight", type=float, default=0.1)
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, torch.get_num_threads()],
        help="torch intra-op thread counts to compare (default: 1 and every core)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*input example was not provided.*")
    queries = query_jpegs(args.queries)
    params: dict[str, object] = {"k": args.k, "popularity_weight": args.popularity_weight}
    print(
        f"single-query latency, in-process pyfunc predict (decode+embed+search+rank); "
        f"gallery {args.n_gallery}, {args.queries} JPEG queries 320x240, k={args.k}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            t0 = time.perf_counter()
            model = mlflow.pyfunc.load_model(str(build_model(backbone, args.n_gallery, Path(tmp))))
            setup_s = time.perf_counter() - t0
            for threads in dict.fromkeys(args.threads):
                torch.set_num_threads(threads)
                times = time_queries(model, queries, params, args.warmup)
                rows.append(
                    {
                        "backbone": backbone,
                        "threads": threads,
                        "p50_ms": percentile(times, 50),
                        "p95_ms": percentile(times, 95),
                        "mean_ms": statistics.fmean(times),
                        "target_p50_ms": TARGET_P50_MS.get(backbone, float("nan")),
                        "build+load_s": setup_s,
                    }
                )
            del model
    table = pd.DataFrame(rows).set_index(["backbone", "threads"])
    print(table.to_string(float_format=lambda x: f"{x:.1f}"))


if __name__ == "__main__":
    main()
