"""Benchmark: the frozen trunk computed once (issue 16) vs three times, on one pipeline's data.

Takes the manifest of a pipeline run (``--main-run-id``: its preprocess and split runs, on the
current ``MLFLOW_TRACKING_URI``) and the configs (``extract``, ``finetune``), and times in one
process, on the same rows:

1. the baseline extraction: plain (before) vs also writing ``trunk/`` (after);
2. fine-tuning's frozen-block outputs for train + val: computed (before) vs read from ``trunk/``
   (after), and whether they are bit-identical; then one fine-tuning from ``trunk/`` (the
   training itself is the same code on the same numbers either way);
3. the re-extraction with that fine-tuned extractor: the full pass (before) vs the later blocks
   from ``trunk/`` (after); the largest cosine distance between the two and the test MAP@R of
   each (every test image queries the others, relevant = same item).

Wall and CPU seconds are printed (the CPU figure is steadier on a shared machine). Figures only,
never pass/fail.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python -m benchmarks.bench_trunk --main-run-id <id>
        [--items 3] [--set epochs=4]   # every 3rd item only; fine-tuning settings
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
import pandas as pd
import torch

from imgsearch import schema
from imgsearch.config import from_dict, load_config
from imgsearch.embed.extract import ExtractConfig, extract
from imgsearch.embed.trunk import TrunkStore, extract_writing_trunk
from imgsearch.embed.trunk_read import extract_from_trunk
from imgsearch.evaluate.retrieval import retrieval_map_at_r
from imgsearch.models.backbones import create_extractor
from imgsearch.train.finetune import FinetuneConfig, finetune
from imgsearch.train.inputs import prepare_inputs
from imgsearch.train.parts import prepare_model
from steps.extract import read_manifest

T = TypeVar("T")


def timed(label: str, call: Callable[[], T], rows: list[dict[str, Any]]) -> T:
    wall, cpu = time.perf_counter(), time.process_time()
    out = call()
    rows.append(
        {
            "stage": label,
            "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu,
        }
    )
    print(f"{label}: {rows[-1]['wall_s']:.1f} s wall, {rows[-1]['cpu_s']:.1f} s CPU", flush=True)
    return out


def test_map_at_r(ids: np.ndarray, emb: np.ndarray, manifest: pd.DataFrame) -> float:
    test = manifest[manifest[schema.SPLIT].astype(str) == "test"]
    items = dict(
        zip(test[schema.IMAGE_ID].astype(str), test[schema.ITEM_ID].astype(str), strict=True)
    )
    keep = [i for i, x in enumerate(ids) if str(x) in items]
    labels = np.array([items[str(ids[i])] for i in keep])
    return retrieval_map_at_r(emb[keep], labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--main-run-id", required=True)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--items", type=int, default=None, help="keep every n-th item only")
    parser.add_argument("--set", action="append", default=[], help="finetune.KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    tags = mlflow.get_run(args.main_run_id).data.tags
    manifest = read_manifest(tags["imgsearch.run.preprocess"], tags["imgsearch.run.split"])
    if args.items:
        items = sorted(manifest[schema.ITEM_ID].astype(str).unique())[:: args.items]
        manifest = manifest[manifest[schema.ITEM_ID].astype(str).isin(items)]
        manifest = manifest.reset_index(drop=True)
    overrides = dict(f"finetune.{kv}".split("=", 1) for kv in args.set)
    cfg_all = load_config(args.profile, overrides)
    ecfg = from_dict(ExtractConfig, cfg_all["extract"])
    fcfg = from_dict(FinetuneConfig, cfg_all["finetune"])
    base = create_extractor(ecfg.backbone, ecfg.weights)
    k, dtype = fcfg.blocks_to_freeze(base.spec.name), fcfg.cache_dtype
    print(f"{len(manifest)} images; {base.spec.name}, trunk = blocks [:{k}] in {dtype}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        before = timed(
            "baseline extract, before", lambda: extract(base, manifest, ecfg, progress=False), rows
        )
        after, path = timed(
            "baseline extract, after (writes trunk/)",
            lambda: extract_writing_trunk(
                base, manifest, ecfg, tmp / "trunk", k, dtype, out=tmp / "e.npy", progress=False
            ),
            rows,
        )
        store = TrunkStore(path)
        same = np.array_equal(before.embeddings, np.asarray(after.embeddings))
        size_mb = (path / "trunk.npy").stat().st_size / 1e6
        print(f"baseline embeddings identical: {same}; trunk.npy {size_mb:.0f} MB")
        print(f"baseline test MAP@R {test_map_at_r(before.ids, before.embeddings, manifest):.4f}")

        model, _ = prepare_model(base, fcfg.method, base.spec.preprocess.size, k)
        computed = timed(
            "finetune frozen outputs, before (computed)",
            lambda: prepare_inputs(copy.deepcopy(model), manifest, fcfg),
            rows,
        )
        read = timed(
            "finetune frozen outputs, after (read)",
            lambda: prepare_inputs(copy.deepcopy(model), manifest, fcfg, store),
            rows,
        )
        for name in ("train_x", "val_x"):
            a, b = getattr(computed, name), getattr(read, name)
            diff = (a.float() - b.float()).abs()
            print(
                f"{name}: {tuple(a.shape)} {a.dtype}; identical {torch.equal(a, b)}; "
                f"max abs diff {float(diff.max()):.3g}; differing values {int((diff > 0).sum())}"
            )
        print(f"read from trunk/: {read.n_from_trunk} rows")
        del computed, read
        result = timed(
            "finetune (from trunk/)",
            lambda: finetune(base, manifest, fcfg, trunk=store),
            rows,
        )
        tuned = result.extractor
        print(
            f"finetune: epochs {result.metrics['epochs_run']:.0f}, best val MAP@R "
            f"{result.metrics['best_val_map_at_r']:.4f}, n_from_trunk "
            f"{result.metrics['n_from_trunk']:.0f}"
        )
        full = timed(
            "re-extract, before (full pass)",
            lambda: extract(tuned, manifest, ecfg, progress=False),
            rows,
        )
        from_trunk = timed(
            "re-extract, after (from trunk/)",
            lambda: extract_from_trunk(
                tuned, manifest, ecfg, store, out=tmp / "r.npy", progress=False
            ),
            rows,
        )
        assert list(full.ids) == list(from_trunk.ids)
        cos = (full.embeddings * np.asarray(from_trunk.embeddings)).sum(axis=1)
        print(
            f"re-extract: max cosine distance {float(1 - cos.min()):.2e}, mean "
            f"{float(1 - cos.mean()):.2e}; failures {len(full.failures)} vs "
            f"{len(from_trunk.failures)}"
        )
        print(
            f"fine-tuned test MAP@R: full pass {test_map_at_r(full.ids, full.embeddings, manifest):.4f}"
            f", from trunk/ {test_map_at_r(from_trunk.ids, np.asarray(from_trunk.embeddings), manifest):.4f}"
        )
    print(pd.DataFrame(rows).to_string(index=False, float_format="%.1f"))


if __name__ == "__main__":
    main()
