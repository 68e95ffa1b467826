"""The tables ``validate`` returns: the clean manifest, the quarantine rows, near-duplicate pairs, metrics."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.data.imageio import fix_codes

STAGE = "validate"
NEAR_DUPLICATE_COLUMNS = (
    "image_id_a",
    "item_id_a",
    "image_id_b",
    "item_id_b",
    "distance",
    "same_item",
    "action",
)


def clean_frame(
    manifest: pd.DataFrame, ok: list[int], results: list[dict[str, Any]]
) -> pd.DataFrame:
    clean = manifest.iloc[ok].copy()
    rows = [results[i] for i in ok]
    clean[schema.SHA256] = [r["sha256"] for r in rows]
    clean[schema.FORMAT] = [r["format"] for r in rows]
    clean[schema.WIDTH] = np.array([r["width"] for r in rows], dtype=np.int64)
    clean[schema.HEIGHT] = np.array([r["height"] for r in rows], dtype=np.int64)
    clean[schema.FIXES] = [";".join(r["fixes"]) for r in rows]
    clean[schema.PHASH] = [r["phash"] for r in rows]
    clean[schema.PATH] = [
        r["clean_path"] if r["clean_path"] else p
        for r, p in zip(rows, clean[schema.PATH], strict=True)
    ]
    return clean.reset_index(drop=True)


def quarantine_frame(
    manifest: pd.DataFrame, rejected: dict[int, tuple[str, str, str | None]]
) -> pd.DataFrame:
    has_uri = schema.URI in manifest.columns
    rows: list[dict[str, object]] = []
    for i in sorted(rejected):
        reason, detail, detected = rejected[i]
        row = manifest.iloc[i]
        rows.append(
            {
                schema.IMAGE_ID: str(row[schema.IMAGE_ID]),
                schema.ITEM_ID: str(row[schema.ITEM_ID]),
                schema.URI: safe_text(str(row[schema.URI])) if has_uri else None,
                schema.STAGE: STAGE,
                schema.REASON: reason,
                schema.DETAIL: detail,
                schema.DETECTED_FORMAT: detected,
            }
        )
    return schema.quarantine_rows(rows)


def validate_metrics(
    manifest: pd.DataFrame,
    clean: pd.DataFrame,
    quarantine: pd.DataFrame,
    pairs: list[dict[str, Any]],
    elapsed: float,
    *,
    all_pairs: bool,
) -> dict[str, float]:
    n = len(manifest)
    metrics: dict[str, float] = {
        "n_input": float(n),
        "n_clean": float(len(clean)),
        "n_quarantined": float(len(quarantine)),
        "n_fixed": float((clean[schema.FIXES] != "").sum()) if len(clean) else 0.0,
        "seconds": elapsed,
        "images_per_s": n / elapsed if elapsed > 0 else 0.0,
        "near_duplicate_pairs_within_item": float(sum(p["same_item"] for p in pairs)),
        "near_duplicate_pairs_cross_item": float(sum(not p["same_item"] for p in pairs))
        if all_pairs
        else float("nan"),
    }
    for reason, count in quarantine[schema.REASON].value_counts().items():
        metrics[f"quarantine.{reason}"] = float(count)
    fix_counts: Counter[str] = Counter()
    for fixes in clean[schema.FIXES] if len(clean) else []:
        fix_counts.update(set(fix_codes(fixes.split(";"))) - {""})
    for code, count in sorted(fix_counts.items()):
        metrics[f"fixes.{code}"] = float(count)
    for fmt, count in clean[schema.FORMAT].value_counts().items() if len(clean) else []:
        metrics[f"format.{fmt}"] = float(count)
    return metrics


def pairs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame({c: pd.Series([], dtype="object") for c in NEAR_DUPLICATE_COLUMNS})
    return pd.DataFrame(rows, columns=list(NEAR_DUPLICATE_COLUMNS))


def safe_text(value: str) -> str:
    """Make text safe for Parquet/UTF-8 (non-UTF-8 file names arrive as lone surrogates)."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")
