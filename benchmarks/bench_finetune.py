"""Benchmark: contrastive fine-tuning vs the pretrained extractor on the emoji demo (issue 4).

Items are emoji, images are the drawings of up to four vendors (google, twitter, facebook,
apple). The split is by item, 60/20/20 (``imgsearch.data.split``, seed 0): test emoji are never seen
in training. Test retrieval follows ``imgsearch.evaluate.retrieval``: each test drawing queries all the
other test drawings, relevant = same emoji. Figures printed (never pass/fail):

- pretrained baseline (ImageNet weights, its own 224 px preprocessing) and the same weights at
  the training resolution: test MAP@R, mAP, P@1 (= hit@1);
- the fine-tuned extractor (``configs/finetune.yaml`` unless overridden): the same, and the ratio
  of its test MAP@R to the baseline's (target: >= 2);
- training images/s, epochs run, best epoch, wall time of the fine-tuning; per-category MAP@R.

    python benchmarks/bench_finetune.py                       # unpacked packages in /tmp/emoji
    python benchmarks/bench_finetune.py --emoji-dir DIR --set epochs=8 --set train_size=128

``--emoji-dir`` holds ``<vendor>/package/emoji.json`` and ``<vendor>/package/img/<vendor>/64/``
(what ``imgsearch.data.demo`` unpacks; ``--fetch`` runs that fetch into the demo cache instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from imgsearch import schema
from imgsearch.config import from_dict, load_config
from imgsearch.data import demo as demo_data
from imgsearch.data.split import SplitConfig, split
from imgsearch.embed.extract import ExtractConfig, extract
from imgsearch.evaluate.retrieval import EvaluateConfig, evaluate
from imgsearch.models.backbones import Extractor, create_extractor
from imgsearch.train.finetune import FinetuneConfig, finetune


def emoji_manifest(emoji_dir: Path, vendors: tuple[str, ...], limit: int | None) -> pd.DataFrame:
    """The demo catalog (``demo_data.write_catalog``: base emoji only) as a manifest."""
    packages = {
        v: emoji_dir / v / "package" for v in vendors if (emoji_dir / v / "package").is_dir()
    }
    if not packages:
        raise SystemExit(f"no unpacked emoji packages under {emoji_dir} (try --fetch)")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "emoji.sqlite"
        demo_data.write_catalog(packages, emoji_dir, db, limit)
        with sqlite3.connect(db) as conn:
            images = pd.read_sql_query("SELECT * FROM images", conn)
            items = pd.read_sql_query("SELECT * FROM items", conn)
        conn.close()
    df = images.merge(items[["item_id", "item_name", "category", "subcategory"]], on="item_id")
    df[schema.PATH] = [str((emoji_dir / uri).resolve()) for uri in df[schema.URI]]
    return df


def test_metrics(
    ext: Extractor, manifest: pd.DataFrame, label: str
) -> tuple[dict[str, Any], pd.DataFrame]:
    test = manifest[manifest[schema.SPLIT] == "test"].reset_index(drop=True)
    start = time.perf_counter()
    res = extract(ext, test, ExtractConfig(), progress=False)
    seconds = time.perf_counter() - start
    cfg = EvaluateConfig(split="test", feature_quality=False, plots=False)
    ev = evaluate(res.ids, res.embeddings, manifest, cfg)
    m = ev.metrics
    print(
        f"{label:<34} {ext.spec.preprocess.size:>4} px  MAP@R {m['map_at_r']:.4f}  mAP {m['map']:.4f}  "
        f"P@1 {m['hit_at_1']:.4f}  ({len(test)} images, extract {len(test) / seconds:.0f} img/s)",
        flush=True,
    )
    per_cat = ev.per_category.set_index("category")["map_at_r"].rename(label)
    return m, per_cat.to_frame()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--emoji-dir", type=Path, default=Path("/tmp/emoji"))
    parser.add_argument(
        "--fetch", action="store_true", help="fetch the demo data (npm) into the demo cache"
    )
    parser.add_argument("--vendors", nargs="+", default=list(demo_data.VENDORS))
    parser.add_argument("--limit", type=int, default=None, help="number of emoji (default: all)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="finetune config override"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = torch's default)"
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s"
    )
    logging.getLogger("imgsearch.train.finetune").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)

    emoji_dir = args.emoji_dir
    if args.fetch:
        emoji_dir = demo_data.fetch_emoji(
            demo_data.default_cache_dir(), args.vendors, args.limit
        ).parent
    manifest = emoji_manifest(emoji_dir.resolve(), tuple(args.vendors), args.limit)
    manifest, split_metrics = split(manifest, from_dict(SplitConfig, load_config()["split"]))
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = from_dict(FinetuneConfig, {**load_config().get("finetune", {}), **overrides})
    print(
        f"emoji: {len(manifest)} drawings of {manifest[schema.ITEM_ID].nunique()} emoji; items train/val/test = "
        f"{split_metrics['n_items_train']}/{split_metrics['n_items_val']}/{split_metrics['n_items_test']}; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"finetune config: {cfg.to_dict()}", flush=True)

    base = create_extractor(args.backbone, "imagenet")
    base_m, per_cat = test_metrics(base, manifest, "pretrained (baseline)")
    small = copy_with_size(base, cfg.train_size or base.spec.preprocess.size)
    if small.spec.preprocess.size != base.spec.preprocess.size:
        _, cat = test_metrics(small, manifest, "pretrained at training size")
        per_cat = per_cat.join(cat)

    start = time.perf_counter()
    result = finetune(base, manifest, cfg)
    wall = time.perf_counter() - start
    tuned_m, cat = test_metrics(result.extractor, manifest, f"fine-tuned ({cfg.method})")
    per_cat = per_cat.join(cat)

    h = result.history
    print()
    print(h.round(4).to_string(index=False))
    print()
    print(per_cat.round(3).to_string())
    print()
    ratio = tuned_m["map_at_r"] / base_m["map_at_r"]
    print(
        f"test MAP@R: baseline {base_m['map_at_r']:.4f} -> fine-tuned {tuned_m['map_at_r']:.4f}  (x{ratio:.2f})"
    )
    print(f"test mAP:   baseline {base_m['map']:.4f} -> fine-tuned {tuned_m['map']:.4f}")
    print(f"test P@1:   baseline {base_m['hit_at_1']:.4f} -> fine-tuned {tuned_m['hit_at_1']:.4f}")
    print(
        f"fine-tuning: {int(result.metrics['epochs_run'])} epochs (best {int(result.metrics['best_epoch'])}, "
        f"stop: {result.stop_reason}), {result.metrics['train_images_per_s']:.1f} training images/s, "
        f"wall {wall / 60:.1f} min"
    )


def copy_with_size(ext: Extractor, size: int) -> Extractor:
    """The same weights, preprocessed at ``size`` px."""
    spec = dataclasses.replace(
        ext.spec, preprocess=dataclasses.replace(ext.spec.preprocess, size=size)
    )
    return Extractor(ext.body, spec).eval()


if __name__ == "__main__":
    sys.exit(main())
