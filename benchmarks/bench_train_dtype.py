"""Benchmark: fine-tuning's steps in float32 vs bfloat16 autocast (issue 16), side by side.

Takes one pipeline's data (``--main-run-id``: its preprocess and split runs and the baseline
extract run's ``trunk/``, on the current ``MLFLOW_TRACKING_URI``) and ``configs/finetune.yaml``,
then fine-tunes the baseline extractor with ``train_dtype`` float32 and bfloat16 in turn
(``--rounds`` times each, alternating, so host load falls on both alike), from the same trunk.
For each run it prints the training images/s, the wall and CPU time, the epochs, the best epoch
and val MAP@R (what chooses), and the test MAP@R of the re-extraction from the trunk (every test
image queries the others, relevant = same item: reported, never used to choose). Then the
ratios bfloat16 / float32, and for each round the test MAP@R difference with a paired bootstrap
over test items (per-query AP@R of the same queries, items resampled; 95% interval), so a
difference can be read against the noise of 382 test emoji. Figures only, never pass/fail.

bfloat16 runs only where the CPU computes it natively (:func:`imgsearch.train.precision.native_bf16`);
elsewhere both rows are float32 and the printout says so.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python -m benchmarks.bench_train_dtype \\
        --main-run-id <id> [--rounds 1] [--set epochs=2]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.config import from_dict, load_config
from imgsearch.embed.extract import ExtractConfig
from imgsearch.embed.trunk import TrunkStore
from imgsearch.embed.trunk_read import extract_from_trunk
from imgsearch.evaluate import metrics as M
from imgsearch.evaluate.retrieval import rank_relevance
from imgsearch.models.backbones import load_extractor
from imgsearch.train.finetune import FinetuneConfig, finetune
from imgsearch.train.precision import native_bf16
from steps.extract import read_manifest


def test_ap_at_r(
    ids: np.ndarray, emb: np.ndarray, manifest: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray]:
    """``(AP@R per test image, its item)`` in ``ids`` order: each test image queries the others."""
    test = manifest[manifest[schema.SPLIT].astype(str) == "test"]
    item = dict(
        zip(test[schema.IMAGE_ID].astype(str), test[schema.ITEM_ID].astype(str), strict=True)
    )
    keep = np.array([i for i, x in enumerate(ids) if str(x) in item], dtype=np.int64)
    labels = np.array([item[str(ids[i])] for i in keep])
    ap = [
        M.per_query_metrics(rel, n_rel, (1,))["ap_at_r"]
        for _, _, rel, n_rel in rank_relevance(M.l2_normalise(emb[keep]), labels)
    ]
    return np.concatenate(ap), labels


def paired_interval(
    a: np.ndarray, b: np.ndarray, items: np.ndarray, n: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of mean(b) - mean(a) over the same queries, test items resampled."""
    ok = ~(np.isnan(a) | np.isnan(b))
    names = np.unique(items[ok])
    rows = {name: np.flatnonzero(ok & (items == name)) for name in names}
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        pick = np.concatenate([rows[name] for name in rng.choice(names, len(names))])
        diffs.append(b[pick].mean() - a[pick].mean())
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--main-run-id", required=True)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="finetune.KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tags = mlflow.get_run(args.main_run_id).data.tags
    manifest = read_manifest(tags["imgsearch.run.preprocess"], tags["imgsearch.run.split"])
    extract_run = tags["imgsearch.run.extract"]
    cfg_all = load_config(args.profile, dict(f"finetune.{kv}".split("=", 1) for kv in args.set))
    ecfg = from_dict(ExtractConfig, cfg_all["extract"])
    base_cfg = {**cfg_all["finetune"], "checkpoint_dir": None}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = load_extractor(
            Path(
                mlflow.artifacts.download_artifacts(f"runs:/{extract_run}/extractor", dst_path=tmp)
            )
        )
        store = TrunkStore(
            Path(mlflow.artifacts.download_artifacts(f"runs:/{extract_run}/trunk", dst_path=tmp))
        )
        print(
            f"{len(manifest)} images; trunk blocks [:{store.blocks}] {store.dtype}; "
            f"native bfloat16 on this CPU: {native_bf16()}"
        )
        rows: list[dict[str, Any]] = []
        per_query: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        for round_ in range(args.rounds):
            for dtype in ("float32", "bfloat16"):
                cfg = from_dict(FinetuneConfig, {**base_cfg, "train_dtype": dtype})
                wall, cpu = time.perf_counter(), time.process_time()
                result = finetune(base, manifest, cfg, trunk=store)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                emb = extract_from_trunk(
                    result.extractor, manifest, ecfg, store, out=tmp / "r.npy", progress=False
                )
                m = result.metrics
                ap, items = test_ap_at_r(np.asarray(emb.ids), np.asarray(emb.embeddings), manifest)
                per_query[(round_, dtype)] = (ap, items)
                rows.append(
                    {
                        "round": round_,
                        "train_dtype": dtype,
                        "bf16_used": bool(m["train_bf16"]),
                        "img_per_s": m["train_images_per_s"],
                        "wall_s": wall,
                        "cpu_s": cpu,
                        "epochs": int(m["epochs_run"]),
                        "best_epoch": int(m["best_epoch"]),
                        "best_val_map_at_r": m["best_val_map_at_r"],
                        "test_map_at_r": float(np.nanmean(ap)),
                    }
                )
                print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
            (a, items), (b, _) = per_query[(round_, "float32")], per_query[(round_, "bfloat16")]
            low, high = paired_interval(a, b, items)
            print(
                f"round {round_}: test MAP@R bfloat16 - float32 {np.nanmean(b) - np.nanmean(a):+.4f}, "
                f"paired bootstrap over test items 95% [{low:+.4f}, {high:+.4f}]",
                flush=True,
            )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="%.4f"))
    mean = table.groupby("train_dtype")[["img_per_s", "wall_s", "best_val_map_at_r"]].mean()
    if {"float32", "bfloat16"} <= set(mean.index):
        ratio = mean.loc["bfloat16"] / mean.loc["float32"]
        print(
            f"bfloat16 / float32: training images/s x{ratio['img_per_s']:.2f}, "
            f"wall x{ratio['wall_s']:.2f}, best val MAP@R x{ratio['best_val_map_at_r']:.3f}"
        )


if __name__ == "__main__":
    main()
