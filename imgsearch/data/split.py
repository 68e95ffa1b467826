"""Train / val / test split of a manifest, by item (default) or by image.

By item, every image of an item lands in the same split, so test items are never seen in training:
retrieval on the test split measures generalisation to new items. By image, an item's images are
scattered (each image is assigned on its own), which measures retrieval of new views of known items.

Assignment is a seeded hash, not a shuffle: each key (``item_id`` or ``image_id``) is mapped to
``u = sha256(f"{seed}:{key}") / 2**64`` in [0, 1) and lands in ``train`` when ``u < f_train``, in
``val`` when ``u < f_train + f_val``, else in ``test``. Hence the split is

- deterministic for a seed, and independent of row order;
- frozen: adding new items never moves an old one (the test split the promotion gate compares
  champion and challenger on stays the same while the catalogue grows);
- proportional only in expectation: the realised fractions have binomial noise (about
  ``sqrt(f(1-f)/n_items)``), reported in the metrics.

``stratify_by="category"`` trades the frozen property for exact per-category proportions: within
each category, items are ordered by the same hash and cut at the cumulative fractions (largest
remainder). The assignment is still order-independent and deterministic, but a new item can shift
the cut of its category and move one old item across a boundary.

Items with one image are kept: in the gallery they act as distractors, but as queries they have no
relevant partner; the metrics report how many val/test items have at least two images there.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.errors import CatalogError, ConfigError

log = logging.getLogger(__name__)

_BY = ("item", "image")
_NA_STRATUM = "<NA>"


@dataclass
class SplitConfig:
    """How to split. ``fractions`` are (train, val, test): non-negative, summing to 1."""

    by: str = "item"
    fractions: Sequence[float] = (0.7, 0.1, 0.2)
    seed: int = 0
    stratify_by: str | None = None

    def __post_init__(self) -> None:
        if self.by not in _BY:
            raise ConfigError(f"split.by must be one of {_BY}, got {self.by!r}")
        fractions = tuple(float(f) for f in self.fractions)
        if len(fractions) != 3:
            raise ConfigError(f"split.fractions must be (train, val, test), got {self.fractions!r}")
        if any(not np.isfinite(f) or f < 0 for f in fractions):
            raise ConfigError(f"split.fractions must be finite and non-negative, got {fractions}")
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ConfigError(
                f"split.fractions must sum to 1, got {fractions} (sum {sum(fractions)})"
            )
        total = sum(fractions)
        self.fractions = tuple(f / total for f in fractions)
        if self.stratify_by is not None and self.by != "item":
            raise ConfigError("split.stratify_by is only supported with by='item'")


def hash_unit(keys: Sequence[str] | pd.Series, seed: int) -> np.ndarray:
    """Map each key to a pseudo-uniform float in [0, 1), from ``sha256(f"{seed}:{key}")``."""
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return out


def _assign_by_hash(u: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    cut_train = fractions[0]
    cut_val = fractions[0] + fractions[1]
    names = np.asarray(schema.SPLITS, dtype=object)
    idx = np.where(u < cut_train, 0, np.where(u < cut_val, 1, 2))
    if fractions[2] == 0:  # train + val may sum to 0.99999...: a zero test fraction stays empty
        idx[idx == 2] = 1 if fractions[1] > 0 else 0
    return names[idx]


def _quota(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` into integer counts proportional to ``fractions`` (largest remainder, ties to the earlier split)."""
    raw = [n * f for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda j: (-(raw[j] - counts[j]), j))
    for j in order[: n - sum(counts)]:
        counts[j] += 1
    return counts


def _assign_stratified(keys: pd.Series, strata: pd.Series, cfg: SplitConfig) -> np.ndarray:
    u = hash_unit(keys.astype(str).tolist(), cfg.seed)
    out = np.empty(len(keys), dtype=object)
    strata_values = strata.to_numpy()
    for stratum in pd.unique(strata_values):
        pos = np.flatnonzero(strata_values == stratum)
        # Sort by hash, then by key, so the cut does not depend on row order.
        order = pos[np.lexsort((keys.to_numpy()[pos].astype(str), u[pos]))]
        counts = _quota(len(order), cfg.fractions)
        start = 0
        for name, count in zip(schema.SPLITS, counts, strict=True):
            out[order[start : start + count]] = name
            start += count
    return out


def _item_strata(manifest: pd.DataFrame, column: str) -> pd.Series:
    """One stratum per item: its first non-empty value of ``column`` (``<NA>`` when it has none)."""
    if column not in manifest.columns:
        raise ConfigError(f"split.stratify_by={column!r} is not a manifest column")
    values = manifest[[schema.ITEM_ID, column]].copy()
    values[column] = values[column].astype("object").where(values[column].notna(), None)
    values[column] = values[column].map(lambda v: None if v is None or str(v) == "" else str(v))
    first = values.dropna(subset=[column]).groupby(schema.ITEM_ID, sort=True)[column].first()
    items = pd.Index(pd.unique(manifest[schema.ITEM_ID]))
    return first.reindex(items).fillna(_NA_STRATUM)


def _check_manifest(manifest: pd.DataFrame) -> None:
    missing = [c for c in (schema.IMAGE_ID, schema.ITEM_ID) if c not in manifest.columns]
    if missing:
        raise CatalogError(f"manifest lacks columns {missing}")
    if manifest[schema.IMAGE_ID].isna().any() or manifest[schema.ITEM_ID].isna().any():
        raise CatalogError("manifest has empty image_id or item_id values")
    dup = manifest[schema.IMAGE_ID].duplicated()
    if dup.any():
        example = manifest.loc[dup, schema.IMAGE_ID].iloc[0]
        raise CatalogError(
            f"manifest has {int(dup.sum())} duplicate image_id values (e.g. {example!r})"
        )


def split(manifest: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add a ``split`` column (train / val / test) to ``manifest``; return it with split metrics.

    The input is not modified; an existing ``split`` column is replaced. Raises
    :class:`~imgsearch.errors.CatalogError` on missing/empty ids or duplicate ``image_id``.

    Metrics: ``n_items_<split>``, ``n_images_<split>``, ``frac_images_<split>``,
    ``frac_items_<split>`` for each split; ``n_<split>_items_with_2plus_images`` and
    ``n_<split>_queries`` (images whose item has another image in the same split) for val and
    test; ``n_items_in_several_splits`` (0 by item; by image, items that straddle splits).
    """
    _check_manifest(manifest)
    out = manifest.copy()
    if schema.SPLIT in out.columns:
        log.info("replacing the existing %r column", schema.SPLIT)
    if len(out) == 0:
        out[schema.SPLIT] = pd.Series([], dtype="object")
        return out, _split_metrics(out)

    if cfg.by == "image":
        keys = out[schema.IMAGE_ID].astype(str)
        out[schema.SPLIT] = _assign_by_hash(hash_unit(keys.tolist(), cfg.seed), cfg.fractions)
    else:
        items = pd.Series(pd.unique(out[schema.ITEM_ID].astype(str)))
        if cfg.stratify_by is None:
            assigned = _assign_by_hash(hash_unit(items.tolist(), cfg.seed), cfg.fractions)
        else:
            strata = _item_strata(
                out.assign(**{schema.ITEM_ID: out[schema.ITEM_ID].astype(str)}), cfg.stratify_by
            )
            assigned = _assign_stratified(items, strata.reindex(items).reset_index(drop=True), cfg)
        mapping = dict(zip(items, assigned, strict=True))
        out[schema.SPLIT] = out[schema.ITEM_ID].astype(str).map(mapping)
    out[schema.SPLIT] = out[schema.SPLIT].astype("object")

    metrics = _split_metrics(out)
    log.info(
        "split by %s: images train/val/test = %d/%d/%d, test items with >=2 images = %d",
        cfg.by,
        metrics["n_images_train"],
        metrics["n_images_val"],
        metrics["n_images_test"],
        metrics["n_test_items_with_2plus_images"],
    )
    return out, metrics


def _split_metrics(df: pd.DataFrame) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    n_images = len(df)
    n_items = int(df[schema.ITEM_ID].nunique())
    for name in schema.SPLITS:
        part = df[df[schema.SPLIT] == name]
        metrics[f"n_images_{name}"] = int(len(part))
        metrics[f"n_items_{name}"] = int(part[schema.ITEM_ID].nunique())
        metrics[f"frac_images_{name}"] = len(part) / n_images if n_images else 0.0
        metrics[f"frac_items_{name}"] = metrics[f"n_items_{name}"] / n_items if n_items else 0.0
        if name != "train":
            sizes = part.groupby(schema.ITEM_ID).size()
            metrics[f"n_{name}_items_with_2plus_images"] = int((sizes >= 2).sum())
            metrics[f"n_{name}_queries"] = int(sizes[sizes >= 2].sum())
    splits_per_item = (
        df.groupby(schema.ITEM_ID)[schema.SPLIT].nunique() if n_images else pd.Series([])
    )
    metrics["n_items_in_several_splits"] = int((splits_per_item > 1).sum())
    metrics["n_images"] = n_images
    metrics["n_items"] = n_items
    return metrics
