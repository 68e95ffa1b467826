"""Load test: a real ``mlflow models serve`` under mixed good and hostile requests (issue #17.3).

Starts the index model on 127.0.0.1 (a free port) from a tiny synthetic registered index (the
one ``tests/search_env.py`` builds: six 64 px PNGs, a random-init 64 px MobileNetV2), warms it
up, then sends a bounded, shuffled mix from a few threads:

* ``good``: one 320x240 JPEG query;  ``batch``: eight of them in one request;
* ``bombs``: eight 40 MP PNGs (~60 KB each) in one request, what the issue sent;
* ``nested``: ``{"inputs": [[[[...]]]]}`` 100 000 levels deep;
* ``typo``: a good query with ``params: {"catgory": ...}``.

Prints p50/p95 latency and the status codes per kind, the server process tree's RSS (from
``/proc``) at baseline (after warm-up), its peak during the burst and after the burst, then stops
the server's whole process group. Figures only, never pass/fail.

    python -m benchmarks.bench_serving_load                # 4 threads, 10 of each hostile kind
    python -m benchmarks.bench_serving_load --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image

from benchmarks.bench_serving import query_jpegs
from tests.search_env import get_env, serve_model

PAGE = os.sysconf("SC_PAGE_SIZE")


class _TmpFactory:
    """What ``tests.search_env.get_env`` needs of pytest's ``tmp_path_factory``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        return path


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (``/proc``; processes that vanish are 0)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children[ppid].append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except OSError:
            pass
    return total


class PeakSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak = pid, every_s, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(self.every_s)


def bomb_png() -> str:
    buf = io.BytesIO()
    Image.new("L", (7000, 5714), 0).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def payloads(rounds: int, seed: int = 0) -> list[tuple[str, str]]:
    """Shuffled ``(kind, body)``: 4 good and 1 batch per round, 1 of each hostile kind."""
    jpegs = query_jpegs(8)
    bomb = bomb_png()
    split = lambda imgs: {"columns": ["image"], "data": [[i] for i in imgs]}  # noqa: E731
    kinds = {
        "good": json.dumps({"dataframe_split": split(jpegs[:1]), "params": {"k": 5}}),
        "batch": json.dumps({"dataframe_split": split(jpegs), "params": {"k": 5}}),
        "bombs": json.dumps({"inputs": {"image": [bomb] * 8}}),
        "nested": '{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "typo": json.dumps({"dataframe_split": split(jpegs[:1]), "params": {"catgory": "dogs"}}),
    }
    mix = ["good"] * 4 + ["batch", "bombs", "nested", "typo"]
    out = [(kind, kinds[kind]) for _ in range(rounds) for kind in mix]
    random.Random(seed).shuffle(out)
    return out


def send(base: str, body: str) -> tuple[int, float]:
    start = time.perf_counter()
    response = requests.post(
        f"{base}/invocations",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=120,
    )
    return response.status_code, time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(rounds: int, threads: int, workdir: Path) -> None:
    env = get_env(_TmpFactory(workdir))  # type: ignore[arg-type]
    mix = payloads(rounds)
    with serve_model(env.uri, workdir / "serve") as server:
        pid = server.proc.pid
        for kind, body in mix[:10]:  # warm-up: import paths, allocator pools
            if kind in ("good", "batch"):
                send(server.url, body)
        time.sleep(1.0)
        baseline = tree_rss(pid)
        sampler = PeakSampler(pid)
        sampler.start()
        results: dict[str, list[tuple[int, float]]] = defaultdict(list)
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            futures = [(kind, pool.submit(send, server.url, body)) for kind, body in mix]
            for kind, future in futures:
                results[kind].append(future.result())
        wall = time.perf_counter() - start
        time.sleep(3.0)
        sampler.done.set()
        sampler.join()
        after = tree_rss(pid)
        log_tail = server.log(600)
    mb = 1024 * 1024
    print(f"{len(mix)} requests from {threads} threads in {wall:.1f} s")
    print(f"{'kind':<8}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}  status codes")
    for kind, rows in sorted(results.items()):
        times = [t * 1000 for _, t in rows]
        codes = dict(sorted(_count(rows).items()))
        print(
            f"{kind:<8}{len(rows):>4}{_pct(times, 0.5):>10.0f}{_pct(times, 0.95):>10.0f}  {codes}"
        )
    print(
        f"server RSS: baseline {baseline / mb:.0f} MB, peak {sampler.peak / mb:.0f} MB, "
        f"after the burst {after / mb:.0f} MB ({(after - baseline) / mb:+.0f} MB)"
    )
    if any(c >= 500 for rows in results.values() for c, _ in rows):
        print("server log tail:\n" + log_tail)


def _count(rows: list[tuple[int, float]]) -> dict[int, int]:
    counts: dict[int, int] = defaultdict(int)
    for code, _ in rows:
        counts[code] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="each round: 8 requests")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    if not 1 <= args.rounds <= 100 or not 1 <= args.threads <= 16:
        parser.error("--rounds in [1, 100], --threads in [1, 16] (a bounded loopback test)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # building the index
    with tempfile.TemporaryDirectory(prefix="bench-serving-load-") as tmp:
        run(args.rounds, args.threads, Path(tmp))


if __name__ == "__main__":
    main()
