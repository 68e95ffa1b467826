"""Benchmark: single-query search latency end to end, in-process through the index pyfunc.

One query = ``IndexModel.predict`` on a one-row DataFrame holding a base64 JPEG: base64 decode +
safe image decode and normalisation + preprocessing + CNN forward + FAISS search + ranking
(popularity, filters) + the output table. Measured for each backbone, serving mode
(:mod:`imgsearch.search.query`: ``eager`` fp32, ``fused`` BN-folded channels-last, ``int8`` ONNX Runtime
static quantisation calibrated on gallery images) and torch thread count, on the same gallery and
queries; p50 / p95 printed side by side with the speed-up over ``eager`` at the same thread
count and the min cosine of the mode's query embeddings against eager fp32 (never pass/fail).

Targets on 2 cores (issue 16): p50 <= 40 ms (MobileNetV2), <= 100 ms (ResNet50).

    python -m benchmarks.bench_serving                     # both backbones, 3 modes, 1 and 2 threads
    python -m benchmarks.bench_serving --backbones resnet50 --modes fused int8 --threads 1

Thread count matters more than the backbone on a shared machine: with more runnable processes
than cores, OpenMP's spinning workers wait for each other at every layer (measured: MobileNetV2
40 ms with 1 thread vs 2 s with 2 at load average 6 on 2 cores). Hence serving's default of 1.

Random-init weights (``weights=none``) are as fast as pretrained ones, except for ``int8``'s
accuracy: MobileNetV2 uses its offline ImageNet weights when available (a random-init MobileNetV2
quantises to zeros and int8 is refused, as it should be). The gallery vectors are random unit
vectors (search time depends on their number and dimension, not their values), except the first
``--calibration`` rows: synthetic JPEGs, four per item (the same drawing shifted a few pixels),
with their fp32 vectors, that int8 calibrates on and checks its MAP@R on through the index
(:func:`registry.decoding.gallery_images`).
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

from imgsearch.data.imageio import open_rgb
from imgsearch.errors import WeightsUnavailableError
from imgsearch.models.backbones import Extractor, create_extractor, fingerprint, save_extractor
from imgsearch.search import query as serving
from imgsearch.search.factory import IndexConfig
from imgsearch.search.index import ImageIndex
from imgsearch.search.query import embed_images
from imgsearch.search.ranking import RankingConfig
from registry import models
from registry.register import MODEL_CODE

BACKBONES = ("mobilenet_v2", "resnet50")
TARGET_P50_MS = {"mobilenet_v2": 40.0, "resnet50": 100.0}


def query_jpegs(
    n: int, width: int = 320, height: int = 240, seed: int = 1, per_item: int = 1
) -> list[str]:
    """``n`` camera-sized JPEG queries, base64-encoded as a client would send them: distinct
    drawings, or with ``per_item`` > 1 runs of ``per_item`` copies of one drawing, each shifted
    by a few pixels (the images of one item)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shapes = [
            (int(rng.integers(0, width - 60)), int(rng.integers(0, height - 50)))
            + tuple(int(v) for v in rng.integers(0, 256, 3))
            for _ in range(6)
        ]
        for k in range(min(per_item, n - len(out))):
            img = Image.new("RGB", (width, height), colour)
            draw = ImageDraw.Draw(img)
            for x0, y0, *fill in shapes:
                x, y = x0 + 4 * k, y0 + 3 * k
                draw.ellipse([x, y, x + 40, y + 30], fill=tuple(fill))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def make_extractor(backbone: str) -> Extractor:
    """ImageNet weights where they load offline (MobileNetV2), random init otherwise."""
    torch.manual_seed(0)
    if backbone == "mobilenet_v2":
        try:
            return create_extractor(backbone, weights="imagenet")
        except WeightsUnavailableError:
            pass
    return create_extractor(backbone, weights="none")


def build_model(ext: Extractor, n_gallery: int, n_calibration: int, root: Path) -> Path:
    """A saved (not registered) index pyfunc: extractor + index of random unit vectors, except
    the first ``n_calibration`` rows: synthetic JPEG files (``path``, four per item) and their fp32
    vectors, for int8 to calibrate and check its MAP@R on."""
    backbone = ext.spec.name
    ext_dir = root / backbone / "extractor"
    save_extractor(ext, ext_dir)
    dim = int(ext.spec.embedding_dim)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n_gallery, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    gallery_dir = root / backbone / "gallery"
    gallery_dir.mkdir(parents=True)
    paths: list[str | None] = [None] * n_gallery
    for i, data in enumerate(query_jpegs(min(n_calibration, n_gallery), seed=2, per_item=4)):
        path = gallery_dir / f"img{i}.jpg"
        path.write_bytes(base64.b64decode(data))
        paths[i] = str(path)
    # the rows with files hold their images' fp32 vectors, as a built index would: int8's check
    # searches them through the index (with random vectors there it would find nothing either way)
    with_files = [p for p in paths if p is not None]
    emb[: len(with_files)] = embed_images(ext, [open_rgb(p) for p in with_files])
    meta = pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(n_gallery)],
            "item_id": [f"item{i // 4}" for i in range(n_gallery)],
            "item_name": [f"thing {i // 4}" for i in range(n_gallery)],
            "category": [f"cat{i % 8}" for i in range(n_gallery)],
            "downloads": rng.integers(0, 10_000, n_gallery),
            "likes": rng.integers(0, 1_000, n_gallery),
            "path": paths,
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
        # MLflow lets load_model override only the keys logged here
        model_config={
            "allow_paths": False,
            "serving_mode": serving.DEFAULT_MODE,
            "torch_threads": serving.DEFAULT_THREADS,
        },
    )
    return model_dir


def min_cosine(ext: Extractor, served: serving.ServingExtractor, queries: list[str]) -> float:
    """Min cosine, over the queries, of the served embeddings against eager fp32's."""
    images = [open_rgb(base64.b64decode(q)) for q in queries]
    reference = embed_images(ext, images)
    got = served.embed(images)
    return float(np.min(np.sum(reference * got, axis=1)))


def time_interleaved(
    models_by_mode: dict[str, object],
    queries: list[str],
    params: dict[str, object],
    warmup: int,
) -> dict[str, list[float]]:
    """Milliseconds per query for each model, the models taking turns on every query."""
    times: dict[str, list[float]] = {mode: [] for mode in models_by_mode}
    for i, q in enumerate(queries[:warmup] + queries):
        frame = pd.DataFrame({"image": [q]})
        for mode, model in models_by_mode.items():
            t0 = time.perf_counter()
            out = model.predict(frame, params=params)  # type: ignore[attr-defined]
            elapsed = (time.perf_counter() - t0) * 1000.0
            assert len(out) == params["k"], out
            if i >= warmup:
                times[mode].append(elapsed)
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--modes", nargs="+", default=list(serving.MODES), choices=serving.MODES)
    p.add_argument("--n-gallery", type=int, default=10_000)
    p.add_argument(
        "--calibration", type=int, default=160, help="gallery images int8 may read (4 per item)"
    )
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
            ext = make_extractor(backbone)
            model_dir = build_model(ext, args.n_gallery, args.calibration, Path(tmp))
            for threads in dict.fromkeys(args.threads):
                loaded = {}
                for mode in dict.fromkeys(args.modes):
                    t0 = time.perf_counter()
                    model = mlflow.pyfunc.load_model(
                        str(model_dir),
                        model_config={"serving_mode": mode, "torch_threads": threads},
                    )
                    loaded[mode] = (model, time.perf_counter() - t0)
                # modes take turns query by query, so a change of machine load hits them alike
                times = time_interleaved(
                    {m: v[0] for m, v in loaded.items()}, queries, params, args.warmup
                )
                for mode, (model, load_s) in loaded.items():
                    served = model.unwrap_python_model().serving
                    rows.append(
                        {
                            "backbone": f"{backbone} ({ext.spec.weights})",
                            "mode": mode,
                            "used": served.mode,
                            "threads": threads,
                            "p50_ms": percentile(times[mode], 50),
                            "p95_ms": percentile(times[mode], 95),
                            "mean_ms": statistics.fmean(times[mode]),
                            "min_cos": min_cosine(ext, served, queries),
                            "target_p50": TARGET_P50_MS.get(backbone, float("nan")),
                            "load_s": load_s,
                            # int8's check at load: MAP@R drop on gallery items (fp32 - int8)
                            "int8_drop": served.metrics.get("int8_map_at_r_drop", float("nan")),
                        }
                    )
                    if mode == "int8":
                        why = served.metrics.get("int8_reason") or served.metrics.get("int8_error")
                        print(f"{backbone} int8 ({threads} thread(s)): {served.mode}: {why}")
                del loaded
    table = pd.DataFrame(rows)
    eager = table[table["mode"] == "eager"].set_index(["backbone", "threads"])["p50_ms"]
    table["x_eager_p50"] = [
        eager.get((b, t), float("nan")) / p50
        for b, t, p50 in zip(table["backbone"], table["threads"], table["p50_ms"], strict=True)
    ]
    table = table.set_index(["backbone", "mode", "threads"])
    print(
        table.to_string(
            float_format=lambda x: f"{x:.1f}",
            formatters={
                "x_eager_p50": lambda x: f"x{x:.2f}",
                "min_cos": lambda x: f"{x:.5f}",
                "int8_drop": lambda x: f"{x:+.4f}",
            },
        )
    )


if __name__ == "__main__":
    main()
