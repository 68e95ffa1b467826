"""Benchmark: the Spark engine in ``local[2]`` against the local engine on the same images.

Prints (never pass/fail): images/s of the local engine (``imgsearch.embed.extract.extract``, every
core), the Spark session's start-up time on its own, then images/s of the Spark engine
(``imgsearch.embed.spark_runner.spark_extract``: partitions, model loads, shards) with the start-up
excluded, the ratio, the driver's peak RSS, and the agreement of the two (min cosine per image).

    python -m benchmarks.bench_spark                       # 5,000 JPEGs, MobileNetV2 @ 224
    python -m benchmarks.bench_spark --n 1000 --size 128   # quicker

Random-init weights (as fast as pretrained ones). Needs ``pip install '.[spark]'`` and Java 17.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_extract import make_images
from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.embed.extract import ExtractConfig, extract
from imgsearch.embed.files import load_embeddings
from imgsearch.embed.spark_runner import SparkConfig, spark_extract, spark_session
from imgsearch.models.backbones import Extractor, create_extractor, save_extractor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = create_extractor(args.backbone, weights="none")
    ext = Extractor(
        base.body, dataclasses.replace(base.spec, preprocess=PreprocessConfig(size=args.size))
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = make_images(work / "images", args.n)
        cfg = ExtractConfig(batch_size=args.batch_size, engine="spark")

        spark_cfg = SparkConfig(master=args.master, conf={"spark.driver.memory": "2g"})
        t0 = time.perf_counter()
        session, _ = spark_session(spark_cfg)
        print(f"spark session start ({args.master}): {time.perf_counter() - t0:.1f} s")
        try:
            ext_dir = save_extractor(ext, work / "extractor")
            res = spark_extract(ext_dir, manifest, work / "embeddings.parquet", cfg, spark_cfg)
        finally:
            session.stop()
        # Spark first: the Python driver's peak so far is the Spark pass's (the JVM is apart)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        local = extract(ext, manifest, cfg, progress=False)
        local_s = time.perf_counter() - t0
        print(f"local engine: {args.n} images in {local_s:.1f} s = {args.n / local_s:.1f} images/s")
        m = res.metrics
        print(
            f"spark engine: {args.n} images in {m['seconds']:.1f} s = {m['images_per_s']:.1f} "
            f"images/s (start-up excluded), {int(m['spark_partitions'])} partitions, "
            f"{int(m['spark_model_loads'])} model loads in "
            f"{int(m['spark_python_workers'])} Python workers"
        )
        print(f"spark / local throughput: {m['images_per_s'] / (args.n / local_s):.2f}x")
        print(f"Python driver peak RSS during the Spark pass: {peak:.0f} MiB (JVM not included)")
        ids, emb = load_embeddings(work / "embeddings.parquet")
        assert list(ids) == list(local.ids)
        cosine = (emb * local.embeddings).sum(axis=1)
        print(f"agreement: min cosine per image {float(np.min(cosine)):.6f}")


if __name__ == "__main__":
    main()
