"""The key figures of the EDA report, as numbers, and which manifest columns are attributes or tags."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.data.eda.render import _labels, _present


def _items(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per item with its attributes (the first image's values)."""
    if schema.ITEM_ID not in manifest.columns:
        raise ValueError("manifest has no 'item_id' column")
    return manifest.drop_duplicates(schema.ITEM_ID, keep="first").reset_index(drop=True)


def report_metrics(manifest: pd.DataFrame, quarantine: pd.DataFrame) -> dict[str, float]:
    """The key figures of the report, as numbers."""
    items = _items(manifest)
    per_item = manifest.groupby(schema.ITEM_ID).size()
    n_images, n_quarantined = len(manifest), len(quarantine)
    seen = n_images + n_quarantined
    metrics: dict[str, float] = {
        "n_images": float(n_images),
        "n_items": float(len(items)),
        "n_categories": float(items[schema.CATEGORY].nunique())
        if _present(items, schema.CATEGORY)
        else 0.0,
        "n_subcategories": float(items[schema.SUBCATEGORY].nunique())
        if _present(items, schema.SUBCATEGORY)
        else 0.0,
        "n_quarantined": float(n_quarantined),
        "quarantine_rate": n_quarantined / seen if seen else 0.0,
    }
    if len(per_item):
        metrics.update(
            images_per_item_mean=float(per_item.mean()),
            images_per_item_median=float(per_item.median()),
            images_per_item_min=float(per_item.min()),
            images_per_item_max=float(per_item.max()),
        )
    if _present(items, schema.NSFW):
        flags = schema.parse_flags(items[schema.NSFW]).dropna()
        if len(flags):
            metrics["nsfw_share"] = float(flags.mean())
    for column in (schema.DOWNLOADS, schema.LIKES):
        if _present(items, column):
            values = pd.to_numeric(items[column], errors="coerce").dropna()
            if len(values):
                metrics[f"{column}_median"] = float(values.median())
                metrics[f"{column}_mean"] = float(values.mean())
    if _present(manifest, schema.FORMAT):
        shares = _labels(manifest[schema.FORMAT]).str.lower().value_counts(normalize=True)
        metrics.update({f"format_share_{fmt}": float(v) for fmt, v in shares.items()})
    return metrics


#: Columns that are bookkeeping, not attributes worth a chart.
_KNOWN_COLUMNS = {
    schema.IMAGE_ID,
    schema.ITEM_ID,
    schema.URI,
    schema.PATH,
    *schema.ITEM_ATTRIBUTES,
    schema.SHA256,
    schema.FORMAT,
    schema.WIDTH,
    schema.HEIGHT,
    schema.FIXES,
    schema.PHASH,
    schema.PRE_PATH,
}
_MAX_ATTRIBUTE_VALUES = (
    60  # a column with more distinct values is an id or free text, not an attribute
)


def _split_tags(value: Any) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(t).strip() for t in value if str(t).strip()]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    text = str(value)
    for sep in ("|", ";"):
        text = text.replace(sep, ",")
    return [t.strip() for t in text.split(",") if t.strip()]


def _attribute_columns(manifest: pd.DataFrame) -> list[str]:
    out = []
    for column in manifest.columns:
        if column in _KNOWN_COLUMNS or not _present(manifest, column):
            continue
        values = manifest[column].dropna()
        try:
            distinct = values.nunique()
        except TypeError:  # unhashable cells (lists): not a categorical attribute
            continue
        if 1 <= distinct <= _MAX_ATTRIBUTE_VALUES:
            out.append(column)
    return out
