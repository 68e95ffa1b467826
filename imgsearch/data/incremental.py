"""Data rules of incremental improvement: new rows into the frozen split, replay, merged vectors.

Pure functions on manifests and arrays (no tracking): ``monitoring.improve`` logs what they return.

- :func:`combine`: the champion's data plus the new rows, a new image of a known item moved to that
  item's split (the frozen split never moves);
- :func:`new_test_rows`: the test images of the items that got new test images (the new data's
  own evaluation set);
- :func:`merge_embeddings`: the old vectors (minus re-embedded ids) then the new ones;
- :func:`trainset`: new train images + a seeded replay of old train images + every val image.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.data.watermark import replay_sample
from imgsearch.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Combined:
    """:func:`combine`'s result: the next generation's data and the new rows as placed in it."""

    manifest: pd.DataFrame
    new_rows: pd.DataFrame
    n_split_conflicts_fixed: int

    def metrics(self, n_old: int) -> dict[str, int]:
        new_split = self.new_rows[schema.SPLIT]
        return {
            "n_old": n_old,
            "n_new": len(self.new_rows),
            "n_images": len(self.manifest),
            "n_split_conflicts_fixed": self.n_split_conflicts_fixed,
            **{f"n_new_{s}": int((new_split == s).sum()) for s in schema.SPLITS},
        }


def combine(old: pd.DataFrame, new_rows: pd.DataFrame) -> Combined:
    """``old`` + ``new_rows`` (both with ``split``); an id already in ``old`` keeps its old row."""
    new_rows = new_rows.copy()
    new_rows[schema.IMAGE_ID] = new_rows[schema.IMAGE_ID].astype(str)
    conflicts = 0
    if schema.SPLIT in old.columns:
        # a new image of a known item goes where the item is: the frozen split never moves
        items = old.assign(_item=old[schema.ITEM_ID].astype(str)).drop_duplicates("_item")
        item_split = items.set_index("_item")[schema.SPLIT].to_dict()
        known = new_rows[schema.ITEM_ID].astype(str).map(item_split)
        moved = known.notna() & (known != new_rows[schema.SPLIT])
        conflicts = int(moved.sum())
        new_rows.loc[moved, schema.SPLIT] = known[moved]
    combined = pd.concat([old, new_rows], ignore_index=True)
    combined = combined.drop_duplicates(schema.IMAGE_ID, keep="first").reset_index(drop=True)
    return Combined(combined, new_rows, conflicts)


def new_test_rows(combined: pd.DataFrame, new_rows: pd.DataFrame) -> tuple[pd.DataFrame, set[str]]:
    """The test rows of ``combined`` whose item got a new test image, and those items."""
    is_test = new_rows[schema.SPLIT] == "test"
    test_items = set(new_rows.loc[is_test, schema.ITEM_ID].astype(str))
    rows = combined[
        combined[schema.ITEM_ID].astype(str).isin(test_items) & (combined[schema.SPLIT] == "test")
    ]
    return rows.reset_index(drop=True), test_items


def merge_embeddings(
    old_ids: np.ndarray, old_emb: np.ndarray, new_ids: np.ndarray, new_emb: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(ids, float32 embeddings, n_reused)``: old vectors of ids not re-embedded, then the new."""
    if old_emb.ndim != 2 or new_emb.ndim != 2 or old_emb.shape[1] != new_emb.shape[1]:
        raise ValueError(f"embedding shapes do not match: {old_emb.shape} vs {new_emb.shape}")
    if len(old_ids) != len(old_emb) or len(new_ids) != len(new_emb):
        raise ValueError("ids and embeddings differ in length")
    keep = ~np.isin(old_ids.astype(str), new_ids.astype(str))
    ids = np.concatenate([old_ids[keep], new_ids])
    emb = np.vstack([old_emb[keep], new_emb]).astype(np.float32)
    return ids, emb, int(keep.sum())


@dataclass(frozen=True)
class ReplayConfig:
    """How many old train images are replayed next to the new ones (``configs/improve.yaml``)."""

    fraction: float = 1.0
    max_images: int | None = 5000
    same_items: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.fraction >= 0:
            raise ConfigError("replay fraction must be >= 0")
        if self.max_images is not None and self.max_images < 0:
            raise ConfigError("replay max must be >= 0 or None")


def trainset(
    combined: pd.DataFrame, to_train: Collection[str], cfg: ReplayConfig
) -> tuple[pd.Series, dict[str, int]] | None:
    """Rows of ``combined`` to fine-tune on (a boolean mask) and their counts.

    New train images (``to_train`` ids in train), the old images of their items and a seeded
    random replay of old train images (:func:`imgsearch.data.watermark.replay_sample`), and
    every val image (early stopping). ``None`` when no new image is in train.
    """
    ids = combined[schema.IMAGE_ID].astype(str)
    train = combined[schema.SPLIT] == "train"
    new_train = train & ids.isin(set(to_train))
    if not new_train.any():
        return None
    old_train = combined[train & ~ids.isin(set(to_train))]
    n_random = int(round(cfg.fraction * int(new_train.sum())))
    if cfg.max_images is not None:
        n_random = min(n_random, cfg.max_images)
    replay = replay_sample(
        old_train[schema.IMAGE_ID].astype(str).tolist(),
        old_train[schema.ITEM_ID].astype(str).tolist(),
        combined.loc[new_train, schema.ITEM_ID].astype(str),
        n_random,
        seed=cfg.seed,
        same_items=cfg.same_items,
    )
    val = combined[schema.SPLIT] == "val"
    rows = new_train | ids.isin(set(replay)) | val
    counts = {
        "n_train_new": int(new_train.sum()),
        "n_train_replay": len(replay),
        "n_val": int(val.sum()),
    }
    return rows, counts
