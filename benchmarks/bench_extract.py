"""Benchmark: the extract pipeline vs the model's own forward speed, vs a naive loop, and its memory.

Prints figures measured side by side in one run (never pass/fail):

- forward-only images/s: the same model on ready-made normalised tensors (batched, channels-last,
  inference mode, every core): the ceiling the pipeline can reach. Target: pipeline >= 0.9x.
- pipeline images/s: ``imgsearch.embed.extract.extract`` from JPEG files (decode + resize + forward), for
  a few (workers x threads) settings, and from the preprocess cache (``pre_path`` .npy files).
  Ratios are against forward-only with every core.
- naive loop images/s: per image ``PIL.Image.open`` + resize + fp32 NCHW forward at batch 1, no
  workers. Target: pipeline >= 4x on 2 cores.
- memory of a fresh process running the pipeline at two N (embeddings streamed to a memmap):
  anonymous memory warm vs peak, and peak RSS. Target: flat.

    python benchmarks/bench_extract.py                       # resnet50 @ 224, a few minutes on 2 cores
    python benchmarks/bench_extract.py --backbone mobilenet_v2 --n 256 --rss-n 128 1024

Random-init weights (``--weights none``) are as fast as pretrained ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from imgsearch.data.preprocess import preprocess, to_tensor, to_uint8
from imgsearch.embed.extract import ExtractConfig, available_cores, extract, resolve_parallelism
from imgsearch.models.backbones import Extractor, create_extractor


def make_images(folder: Path, n: int, width: int = 320, height: int = 240) -> pd.DataFrame:
    """``n`` distinct JPEGs (gradients and shapes), as a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    xx, yy = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    rows = []
    for i in range(n):
        path = folder / f"img{i:05d}.jpg"
        if not path.exists():
            a, b, c = rng.random(3)
            base = np.stack([xx * a, yy * b, (xx + yy) * c / 2], axis=-1) * 255
            img = Image.fromarray(base.astype(np.uint8))
            draw = ImageDraw.Draw(img)
            for _ in range(6):
                x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
                color = tuple(int(v) for v in rng.integers(0, 255, 3))
                draw.rectangle(
                    (x0, y0, x0 + int(rng.integers(10, 80)), y0 + int(rng.integers(10, 80))),
                    fill=color,
                )
            img.save(path, quality=90)
        rows.append(
            {
                "image_id": f"img{i:05d}",
                "item_id": f"item{i:05d}",
                "uri": path.name,
                "path": str(path),
            }
        )
    return pd.DataFrame(rows)


def forward_only(ext: torch.nn.Module, n: int, size: int, batch: int, threads: int) -> float:
    torch.set_num_threads(threads)
    ext = ext.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            ext(x)  # warm-up (oneDNN primitives)
            done, start = 0, time.perf_counter()
            while done < n:
                ext(x)
                done += batch
            return done / (time.perf_counter() - start)
    finally:
        ext.to(memory_format=torch.contiguous_format)


def naive_loop(ext: Extractor, manifest: pd.DataFrame, n: int) -> float:
    """What one writes first: one image at a time, PIL decode, NCHW fp32, default threads."""
    torch.set_num_threads(available_cores())
    pre = ext.spec.preprocess
    paths = manifest["path"].tolist()[:n]
    with torch.no_grad():
        ext(to_tensor(to_uint8(Image.open(paths[0]).convert("RGB"), pre), pre)[None])  # warm-up
        start = time.perf_counter()
        for path in paths:
            x = to_tensor(to_uint8(Image.open(path).convert("RGB"), pre), pre)[None]
            ext(x)
    return len(paths) / (time.perf_counter() - start)


def pipeline_speed(ext: Extractor, manifest: pd.DataFrame, cfg: ExtractConfig) -> float:
    res = extract(ext, manifest, cfg, progress=False)
    assert res.metrics["n_failed"] == 0, res.failures
    return float(res.metrics["images_per_s"])


def _status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def rss_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: extract ``--rss-child`` images; print MiB figures of this process.

    Prints: anonymous memory (heap: what grows with data) after the model is loaded and warm,
    its peak during the pass (sampled every 20 ms), and the process's peak RSS (VmHWM, which
    also counts the mapped torch libraries and the memmap'd output pages).
    """
    manifest = make_images(Path(args.workdir) / "images", args.rss_child)
    ext = create_extractor(args.rss_backbone, weights="none")
    cfg = ExtractConfig(batch_size=args.batch_size)
    extract(ext, manifest.iloc[: args.batch_size], cfg, progress=False)  # warm-up
    before = _status_kib("RssAnon")
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak.append(_status_kib("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        extract(ext, manifest, cfg, out=Path(tmp) / "e.npy", progress=False)
    stop.set()
    sampler.join()
    print(f"{before / 1024:.1f} {max(peak) / 1024:.1f} {_status_kib('VmHWM') / 1024:.1f}")


def parse_setting(text: str) -> tuple[str, int | str, int | str]:
    if text == "auto":
        return text, "auto", "auto"
    workers, threads = text.split("x")
    return text, int(workers), int(threads)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--n", type=int, default=96, help="images for the speed runs")
    parser.add_argument(
        "--naive-n", type=int, default=24, help="images for the naive loop (it is slow)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--settings",
        default="auto,1x1,1x2",
        help="pipeline settings: auto or <workers>x<threads>, comma-separated",
    )
    parser.add_argument(
        "--rss-n", type=int, nargs=2, default=[64, 512], help="the two N for peak RSS"
    )
    parser.add_argument(
        "--rss-backbone", default="mobilenet_v2", help="backbone of the RSS runs (cheaper)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (the best is kept)")
    parser.add_argument("--workdir", default="", help="where images go (default: a temp dir)")
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.rss_child:
        rss_child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        run(args, workdir)


def run(args: argparse.Namespace, workdir: Path) -> None:
    cores = available_cores()
    torch.manual_seed(0)
    ext = create_extractor(args.backbone, weights="none")
    size = ext.spec.preprocess.size
    manifest = make_images(workdir / "images", max(args.n, args.naive_n, *args.rss_n))
    speed = manifest.iloc[: args.n]
    cached = preprocess(speed, ext.spec.preprocess, workdir / "pre", progress=False).manifest
    print(
        f"extract benchmark: {args.backbone} @ {size}px, {cores} cores, torch {torch.__version__}, N={args.n}"
    )
    print(
        f"load average at start {Path('/proc/loadavg').read_text().split()[:3]} (a shared machine is noisy:"
    )
    print(f"every figure is the best of {args.repeat} interleaved runs)\n")

    base = ExtractConfig(batch_size=args.batch_size)
    jobs: dict[str, Callable[[], float]] = {
        f"forward only, ready tensors, batch {args.batch_size}, {cores} threads": lambda: (
            forward_only(ext, args.n, size, args.batch_size, cores)
        ),
        f"forward only, ready tensors, batch {args.batch_size}, 1 thread": lambda: forward_only(
            ext, args.n, size, args.batch_size, 1
        ),
        f"naive loop: PIL, batch 1, fp32 NCHW, no workers (N={args.naive_n})": lambda: naive_loop(
            ext, manifest, args.naive_n
        ),
    }
    for text in args.settings.split(","):
        label, workers, threads = parse_setting(text.strip())
        cfg = dataclasses.replace(base, num_workers=workers, threads=threads)
        w, t = resolve_parallelism(cfg)
        jobs[f"pipeline, decode JPEG, {label} ({w} workers x {t} threads)"] = functools.partial(
            pipeline_speed, ext, speed, cfg
        )
    jobs["pipeline, from pre_path cache, auto"] = functools.partial(
        pipeline_speed, ext, cached, base
    )

    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for label, job in jobs.items():
            best[label] = max(best.get(label, 0.0), job())
    forward = best[next(iter(jobs))]
    naive = best[list(jobs)[2]]
    for label, ips in best.items():
        print(
            f"{label:<62} {ips:8.2f} images/s   x{ips / forward:5.2f} of forward   x{ips / naive:5.2f} of naive"
        )
    print(f"\nmemory of a fresh process ({args.rss_backbone}, embeddings streamed to a memmap):")
    for n in args.rss_n:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rss-child",
                str(n),
                "--workdir",
                str(workdir),
                "--batch-size",
                str(args.batch_size),
            ]
            + ["--rss-backbone", args.rss_backbone],
            check=True,
            capture_output=True,
            text=True,
        )
        before, peak, hwm = (float(v) for v in out.stdout.split()[-3:])
        print(
            f"  N={n:6d}: anonymous memory {before:7.1f} MiB warm -> peak {peak:7.1f} MiB;  peak RSS {hwm:7.1f} MiB"
        )


if __name__ == "__main__":
    main()
