"""Benchmark: int8 (ONNX Runtime static quantisation) against fp32, side by side in one run.

Prints (never pass/fail):

1. extraction images/s from JPEG files, per backbone: the naive fp32 loop (PIL, batch 1, NCHW;
   ``benchmarks.bench_extract.naive_loop``), the project's fp32 pipeline
   (:func:`imgsearch.embed.extract.extract`, auto workers/threads) and the same pipeline with the
   int8 extractor (:func:`imgsearch.models.quantize.quantize`); ratios to naive and to fp32.
   Target (issue #16): ResNet50 @ 224 int8 pipeline >= 4x naive.
2. per-query latency on one thread (p50 / p95): JPEG bytes -> ``open_rgb`` -> preprocessing ->
   forward -> exact FAISS search of a ``--gallery`` (10k) gallery, for fp32 eager, the serving
   default ``fused`` (BN folded, channels-last; :mod:`imgsearch.search.query`) and int8.
   Targets: p50 <= 100 ms (ResNet50), <= 40 ms (MobileNetV2). The registered pyfunc adds
   base64 decoding, ranking and the output table (``benchmarks/bench_serving.py``).
3. retrieval quality on real data: the emoji demo catalog (``steps.fetch_demo``; needs npm the
   first time), MobileNetV2 with its offline ImageNet weights, split by item; int8 calibrated on
   train images; MAP@R of fp32, of int8, and of fp32 queries against int8 vectors (``fp32->int8``:
   an int8-built index searched by the fp32 serving extractor) on val, test and train, and the
   keep/refuse decision of :func:`imgsearch.evaluate.quantization.quality_check`.

    python -m benchmarks.bench_int8                      # both backbones, ~10 minutes on 2 cores
    python -m benchmarks.bench_int8 --backbones mobilenet_v2 --skip-quality

Speed runs use random-init ResNet50 (no offline weights; as fast as pretrained) and ImageNet
MobileNetV2 (a random-init MobileNetV2 quantises to zeros), calibrated on the synthetic JPEGs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch

from benchmarks.bench_extract import make_images, naive_loop
from imgsearch.data.imageio import open_rgb
from imgsearch.data.preprocess import to_tensor, to_uint8
from imgsearch.embed.extract import ExtractConfig, available_cores, extract, resolve_parallelism
from imgsearch.errors import WeightsUnavailableError
from imgsearch.evaluate.int8 import Int8Config, calibration_rows, read_pixels
from imgsearch.evaluate.quantization import quality_check
from imgsearch.models.backbones import Extractor, create_extractor
from imgsearch.models.quantize import QuantizedExtractor, quantize
from imgsearch.search import query as serving

TARGET_P50_MS = {"mobilenet_v2": 40.0, "resnet50": 100.0}


def load_backbone(name: str) -> Extractor:
    torch.manual_seed(0)
    if name == "resnet50":
        return create_extractor(name, weights="none")
    try:
        return create_extractor(name, weights="imagenet")
    except WeightsUnavailableError:
        logging.warning("%s: no ImageNet weights here, random init (int8 may be refused)", name)
        return create_extractor(name, weights="none")


def calibrate(ext: Extractor, manifest: pd.DataFrame, n: int) -> tuple[QuantizedExtractor, float]:
    pixels = read_pixels(manifest.iloc[:n], ext, 32)
    start = time.perf_counter()
    q = quantize(ext, pixels)
    return q, time.perf_counter() - start


def pipeline(model: Extractor | QuantizedExtractor, manifest: pd.DataFrame, batch: int) -> float:
    res = extract(model, manifest, ExtractConfig(batch_size=batch), progress=False)
    assert res.metrics["n_failed"] == 0, res.failures
    return float(res.metrics["images_per_s"])


def extraction(args: argparse.Namespace, workdir: Path) -> None:
    manifest = make_images(workdir / "images", max(args.n, args.naive_n, args.calibration))
    w, t = resolve_parallelism(ExtractConfig())
    print(
        f"1. extraction from {args.n} JPEGs (320x240), {available_cores()} cores, "
        f"pipeline auto = {w} workers x {t} threads, batch {args.batch_size}; "
        f"best of {args.repeat} interleaved runs"
    )
    for name in args.backbones:
        extraction_one(args, name, manifest)


def extraction_one(args: argparse.Namespace, name: str, manifest: pd.DataFrame) -> None:
    ext = load_backbone(name)
    q, seconds = calibrate(ext, manifest, args.calibration)
    jobs: dict[str, Callable[[], float]] = {
        f"naive fp32 loop (PIL, batch 1, N={args.naive_n})": lambda: naive_loop(
            ext, manifest, args.naive_n
        ),
        "fp32 pipeline": lambda: pipeline(ext, manifest.iloc[: args.n], args.batch_size),
        "int8 pipeline (ONNX Runtime)": lambda: pipeline(
            q, manifest.iloc[: args.n], args.batch_size
        ),
    }
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for label, job in jobs.items():
            best[label] = max(best.get(label, 0.0), job())
    naive, fp32 = (best[label] for label in list(jobs)[:2])
    print(f"  {name} @ {ext.spec.preprocess.size} (int8 calibration {seconds:.0f} s):")
    for label, ips in best.items():
        print(
            f"    {label:<40} {ips:8.2f} images/s   x{ips / naive:5.2f} of naive"
            f"   x{ips / fp32:5.2f} of fp32 pipeline"
        )


def latency(args: argparse.Namespace, workdir: Path) -> None:
    manifest = make_images(workdir / "images", max(args.queries, args.calibration))
    blobs = [Path(p).read_bytes() for p in manifest["path"].iloc[: args.queries]]
    print(
        f"\n2. per-query latency, 1 thread: JPEG bytes -> decode -> preprocess -> forward -> "
        f"exact search of {args.gallery} vectors; {args.queries} queries x {args.repeat} rounds"
    )
    for name in args.backbones:
        latency_one(args, name, manifest, blobs)


def latency_one(
    args: argparse.Namespace, name: str, manifest: pd.DataFrame, blobs: list[bytes]
) -> None:
    ext = load_backbone(name)
    q, _ = calibrate(ext, manifest, args.calibration)
    q.set_threads(1)
    fused = serving.prepare_serving(ext, "fused", threads=1)
    dim = ext.spec.embedding_dim
    gallery = np.random.default_rng(0).normal(size=(args.gallery, dim)).astype(np.float32)
    faiss.normalize_L2(gallery)
    index = faiss.IndexFlatIP(dim)
    index.add(gallery)
    pre = ext.spec.preprocess

    def query(model: Callable[[torch.Tensor], torch.Tensor], blob: bytes) -> float:
        start = time.perf_counter()
        x = to_tensor(to_uint8(open_rgb(blob), pre)[None], pre)
        with torch.inference_mode():
            emb = model(x).float().numpy()
        index.search(np.ascontiguousarray(emb), 10)
        return (time.perf_counter() - start) * 1000

    modes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp32 eager": ext,
        "fp32 fused (serving default)": fused.forward,
        "int8 (ONNX Runtime)": q,
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    faiss.omp_set_num_threads(1)
    with serving.torch_threads(1):
        for model in modes.values():
            query(model, blobs[0])  # warm-up
        for _ in range(args.repeat):
            for blob in blobs:
                for mode, model in modes.items():  # interleaved: same load for each mode
                    times[mode].append(query(model, blob))
    eager = statistics.median(times["fp32 eager"])
    print(f"  {name} (target p50 <= {TARGET_P50_MS.get(name, float('nan')):.0f} ms):")
    for mode, ms in times.items():
        p50 = statistics.median(ms)
        p95 = float(np.percentile(ms, 95))
        print(
            f"    {mode:<30} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   x{eager / p50:5.2f} of eager"
        )


def quality(args: argparse.Namespace) -> None:
    from imgsearch.data.demo import DemoConfig, demo_catalog
    from imgsearch.data.ingest import IngestConfig, ingest
    from imgsearch.data.split import SplitConfig, split

    catalog = demo_catalog(DemoConfig(limit=args.demo_limit))
    manifest = ingest(IngestConfig(source="sql", url=f"sqlite:///{catalog}")).manifest
    manifest, _ = split(manifest, SplitConfig())
    ext = load_backbone("mobilenet_v2")
    cfg = ExtractConfig(batch_size=args.batch_size)
    counts = manifest["split"].value_counts().to_dict()
    print(
        f"\n3. MAP@R fp32 vs int8: emoji demo catalog ({args.demo_limit} emoji, {len(manifest)} "
        f"drawings; split by item {counts}), mobilenet_v2 {ext.spec.weights}"
    )
    fp32 = extract(ext, manifest, cfg, progress=False)
    labels = manifest.set_index("image_id").loc[fp32.ids, ["item_id", "split"]]
    for method in args.methods:
        int8_cfg = Int8Config(calibration_images=args.calibration_images, calibration_method=method)
        rows = calibration_rows(manifest, int8_cfg)
        start = time.perf_counter()
        q = quantize(ext, read_pixels(rows, ext, 32), int8_cfg.quantize_config())
        seconds = time.perf_counter() - start
        low = extract(q, manifest, cfg, progress=False)
        assert list(low.ids) == list(fp32.ids)
        print(f"  int8 calibrated on {len(rows)} train drawings, {method} ({seconds:.0f} s):")
        for part in ("val", "test", "train"):
            mask = (labels["split"] == part).to_numpy()
            res = quality_check(
                fp32.embeddings[mask],
                low.embeddings[mask],
                labels["item_id"].astype(str).to_numpy()[mask],
                args.tolerance,
            )
            print(
                f"    {part:<5} ({mask.sum():4d} drawings): MAP@R fp32 {res['map_at_r_fp32']:.4f}"
                f"  int8 {res['map_at_r_int8']:.4f}  fp32->int8 {res['map_at_r_mixed']:.4f}"
                f"  drop {res['map_at_r_drop']:+.4f}"
                f"  cosine min {res['min_cosine']:.4f} mean {res['mean_cosine']:.4f}"
                f"  -> {'keep' if res['keep'] else 'refuse'}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--n", type=int, default=96, help="images for the pipeline runs")
    parser.add_argument("--naive-n", type=int, default=24, help="images for the naive loop")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=64, help="calibration images (speed)")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds per figure")
    parser.add_argument("--demo-limit", type=int, default=300, help="emoji in the demo catalog")
    parser.add_argument("--calibration-images", type=int, default=256, help="for MAP@R")
    parser.add_argument("--methods", nargs="+", default=["minmax"], help="ORT calibration methods")
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"int8 benchmark: torch {torch.__version__}, load average at start {load}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_speed:
            extraction(args, Path(tmp))
        if not args.skip_latency:
            latency(args, Path(tmp))
    if not args.skip_quality:
        quality(args)


if __name__ == "__main__":
    main()
