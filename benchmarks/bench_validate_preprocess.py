"""Throughput and memory of validate + preprocess on small PNGs, at two catalog sizes.

Generates synthetic 64-px PNGs (noise + shapes; every third one RGBA with transparency, which
validate fixes into a clean copy) once, then, for each N, times ``imgsearch.data.validate.validate`` and
``imgsearch.data.preprocess.preprocess`` (cold cache, then warm). Each N runs in a fresh process so
its memory is its own: the figure is the peak anonymous PSS (heap, not shared libraries) of the
process and its worker processes, sampled every 10 ms, above its value just before the work. CPU ms/image (user + system, workers
included) is printed beside wall-clock images/s, because on a shared machine wall-clock
throughput says as much about the neighbours as about the code. Memory that is flat in N gives a growth ratio near 1.

    python -m benchmarks.bench_validate_preprocess --n 500 2000

Prints figures; never passes or fails on time. Target: >= 200 images/s combined on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw


def make_images(root: Path, n: int, size: int = 64, seed: int = 0) -> None:
    """``n`` distinct PNGs under ``root``: noise, 2-5 shapes, every third RGBA on transparency."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, 3)
        noise = rng.normal(0, 30, (size, size, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        rgba = i % 3 == 0
        if rgba:
            img = img.convert("RGBA")
            img.putalpha(0)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
            x1, y1 = x0 + int(rng.integers(6, size - x0)), y0 + int(rng.integers(6, size - y0))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + ((255,) if rgba else ())
            shape = rng.integers(0, 3)
            if shape == 0:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            elif shape == 1:
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
        img.save(root / f"img_{i:06d}.png")


def manifest_of(root: Path, n: int) -> pd.DataFrame:
    """The first ``n`` images of ``root`` as an ingest-style manifest (two images per item)."""
    paths = sorted(root.glob("img_*.png"))[:n]
    if len(paths) < n:
        raise SystemExit(f"{root} holds {len(paths)} images, {n} asked")
    return pd.DataFrame(
        {
            "image_id": [p.stem for p in paths],
            "item_id": [f"item{i // 2}" for i in range(n)],
            "uri": [p.name for p in paths],
            "path": [str(p) for p in paths],
        }
    )


def _memory_bytes(pid: int | None = None) -> tuple[int, frozenset[int]]:
    """Anonymous PSS of ``pid`` (default: this process) plus its descendants (the workers), and
    the set of processes counted.

    PSS, not RSS: forked workers share the parent's pages (torch alone is hundreds of MB), and
    summing RSS would count those once per worker. Anonymous only: the file-backed part (shared
    libraries) moves whenever another process on the machine maps or unmaps the same libraries.
    """
    pid = pid or os.getpid()
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            total = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("Pss_Anon:"))
        children: list[int] = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                children += [int(c) for c in fh.read().split()]
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return 0, frozenset()  # the process ended between two reads
    pids = {pid}
    for child in children:
        size, below = _memory_bytes(child)
        total += size
        pids |= below
    return total, frozenset(pids)


def _cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (pool workers, once joined)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class PeakMemory:
    """Peak memory (anonymous PSS) of this process and its workers while the block runs (sampled)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        # A sample taken while a worker forks or exits reads the parent and the child at
        # different instants and counts shared pages twice: only samples whose process set is
        # the same as the previous sample's count.
        previous: frozenset[int] = frozenset()
        while not self._stop.is_set():
            size, pids = _memory_bytes()
            if pids == previous:
                self.peak = max(self.peak, size)
            previous = pids
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = _memory_bytes()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def run_one(images: Path, n: int, size: int, workers: int) -> dict[str, Any]:
    """One catalog size, in this process; returns the figures."""
    from imgsearch.data.preprocess import PreprocessConfig, preprocess
    from imgsearch.data.validate import ValidateConfig, validate

    manifest = manifest_of(images, n)
    with tempfile.TemporaryDirectory(prefix="bench_vp_") as tmp:
        root = Path(tmp)
        vcfg = ValidateConfig(workers=workers)
        pcfg = PreprocessConfig(size=size)

        with PeakMemory() as mem:
            c0, t0 = _cpu_seconds(), time.perf_counter()
            checked = validate(manifest, vcfg, root / "clean")
            c1, t1 = _cpu_seconds(), time.perf_counter()
            cold = preprocess(checked.clean, pcfg, root / "pre", workers=workers, progress=False)
            c2, t2 = _cpu_seconds(), time.perf_counter()
        warm = preprocess(checked.clean, pcfg, root / "pre", workers=workers, progress=False)
        t3 = time.perf_counter()
        cache_mb = sum(p.stat().st_size for p in (root / "pre").rglob("*.npy")) / 2**20

    n_clean = len(checked.clean)
    return {
        "n": n,
        "n_clean": n_clean,
        "n_quarantined": len(checked.quarantine) + len(cold.quarantine),
        "validate_s": t1 - t0,
        "preprocess_s": t2 - t1,
        "warm_s": t3 - t2,
        "validate_ips": n / (t1 - t0),
        "preprocess_ips": n_clean / (t2 - t1),
        "combined_ips": n / (t2 - t0),
        "warm_ips": n_clean / (t3 - t2),
        "validate_cpu_ms": (c1 - c0) / n * 1000,
        "preprocess_cpu_ms": (c2 - c1) / n_clean * 1000,
        "cache_hits_warm": warm.metrics["cache_hits"],
        "mem_start_mb": mem.start / 2**20,
        "mem_growth_mb": mem.growth_mb,
        "cache_mb": cache_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n", type=int, nargs="+", default=[500, 2000], help="catalog sizes (default 500 2000)"
    )
    parser.add_argument(
        "--size", type=int, default=224, help="preprocess output side (default 224)"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: cores)"
    )
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_one(args.images, args.child, args.size, args.workers)))
        return

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_vp_images_") as images:
        # Generated once, here: the measured processes start from imports only.
        make_images(Path(images), max(args.n))
        for n in args.n:
            cmd = [sys.executable, "-m", "benchmarks.bench_validate_preprocess", "--child", str(n)]
            cmd += ["--images", images, "--size", str(args.size), "--workers", str(args.workers)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))

    print(
        f"validate + preprocess: 64-px PNGs -> {args.size}x{args.size} uint8, {args.workers} worker(s), "
        f"{os.cpu_count()} cores"
    )
    rows = [
        ("images", "n", "{:.0f}"),
        ("clean after validate", "n_clean", "{:.0f}"),
        ("quarantined", "n_quarantined", "{:.0f}"),
        ("validate images/s", "validate_ips", "{:.0f}"),
        ("preprocess images/s (cold cache)", "preprocess_ips", "{:.0f}"),
        ("validate + preprocess images/s", "combined_ips", "{:.0f}"),
        ("preprocess images/s (warm cache)", "warm_ips", "{:.0f}"),
        ("warm cache hits", "cache_hits_warm", "{:.0f}"),
        ("validate CPU ms/image", "validate_cpu_ms", "{:.2f}"),
        ("preprocess CPU ms/image", "preprocess_cpu_ms", "{:.2f}"),
        ("memory before work (anon PSS MB)", "mem_start_mb", "{:.1f}"),
        ("peak memory growth (anon PSS MB)", "mem_growth_mb", "{:.1f}"),
        ("cache on disk (MB)", "cache_mb", "{:.1f}"),
    ]
    width = 34
    print(f"{'':<{width}}" + "".join(f"{'N=' + str(r['n']):>12}" for r in results))
    for label, key, fmt in rows:
        print(f"{label:<{width}}" + "".join(f"{fmt.format(r[key]):>12}" for r in results))
    if len(results) >= 2:
        a, b = results[0], results[-1]
        ratio = b["mem_growth_mb"] / a["mem_growth_mb"] if a["mem_growth_mb"] > 0 else float("nan")
        print(
            f"N x{b['n'] / a['n']:.1f} -> peak memory growth x{ratio:.2f} "
            f"({a['mem_growth_mb']:.1f} MB -> {b['mem_growth_mb']:.1f} MB); "
            f"combined throughput x{b['combined_ips'] / a['combined_ips']:.2f}"
        )


if __name__ == "__main__":
    main()
