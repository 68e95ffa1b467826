"""Column names shared by every stage. One place, so stages agree on the manifest's shape."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

# --- manifest: one row per image -------------------------------------------------------------
IMAGE_ID = "image_id"  # str, unique
ITEM_ID = "item_id"  # str; an item has one or more images
URI = "uri"  # str, as the catalog gave it (relative to the data root, or absolute inside it)
PATH = (
    "path"  # str, absolute path resolved inside the data root (ingest) or the fixed copy (validate)
)

# optional item attributes (kept when the source has them; left empty, never invented)
ITEM_NAME = "item_name"
CATEGORY = "category"
SUBCATEGORY = "subcategory"
TAGS = "tags"
DOWNLOADS = "downloads"
LIKES = "likes"
NSFW = "nsfw"
CREATED_AT = "created_at"
ITEM_ATTRIBUTES = (ITEM_NAME, CATEGORY, SUBCATEGORY, TAGS, DOWNLOADS, LIKES, NSFW, CREATED_AT)

# added by validate
SHA256 = "sha256"  # of the original file's bytes
FORMAT = "format"  # detected from magic bytes: JPEG, PNG, GIF, WEBP, BMP, TIFF
WIDTH = "width"
HEIGHT = "height"
FIXES = "fixes"  # ';'-joined codes of what normalisation/cleaning changed ('' when nothing)
PHASH = "phash"  # perceptual hash, hex

# added by preprocess
PRE_PATH = "pre_path"  # cached preprocessed uint8 array (.npy)

# added by split
SPLIT = "split"  # train | val | test
SPLITS = ("train", "val", "test")

REQUIRED_MANIFEST_COLUMNS = (IMAGE_ID, ITEM_ID, URI)

# --- quarantine: one row per rejected or dropped file -----------------------------------------
STAGE = "stage"
REASON = "reason"
DETAIL = "detail"
DETECTED_FORMAT = "detected_format"
QUARANTINE_COLUMNS = (IMAGE_ID, ITEM_ID, URI, STAGE, REASON, DETAIL, DETECTED_FORMAT)


def empty_quarantine() -> pd.DataFrame:
    """An empty quarantine table with the right columns (all str)."""
    return pd.DataFrame({c: pd.Series([], dtype="object") for c in QUARANTINE_COLUMNS})


def quarantine_rows(rows: list[dict[str, object]]) -> pd.DataFrame:
    """Build a quarantine table from dicts; missing keys become None, extra keys are an error."""
    if not rows:
        return empty_quarantine()
    extra = set().union(*(r.keys() for r in rows)) - set(QUARANTINE_COLUMNS)
    if extra:
        raise ValueError(f"unknown quarantine columns: {sorted(extra)}")
    return pd.DataFrame([{c: r.get(c) for c in QUARANTINE_COLUMNS} for r in rows]).astype("object")


# --- flag columns (nsfw) ------------------------------------------------------------------------
#: Accepted spellings of a flag in a text column (compared after strip + lower-case).
TRUE_SPELLINGS = frozenset({"true", "t", "yes", "y", "1"})
FALSE_SPELLINGS = frozenset({"false", "f", "no", "n", "0"})


def parse_flag(value: Any) -> bool | None:
    """One flag value parsed strictly: ``True``/``False``, or ``None`` when unknown.

    bool -> itself; a number -> ``value != 0``; a str -> True/False when it is one of
    :data:`TRUE_SPELLINGS` / :data:`FALSE_SPELLINGS`; missing (None, NaN, NA) and anything else
    (other text, lists, ...) -> None. Callers decide what unknown means (EDA counts it apart;
    ranking's ``exclude_nsfw`` keeps the row).
    """
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return bool(value != 0)
    text = str(value).strip().lower()
    if text in TRUE_SPELLINGS:
        return True
    if text in FALSE_SPELLINGS:
        return False
    return None


def parse_flags(values: pd.Series) -> pd.Series:
    """:func:`parse_flag` of each value, as a nullable ``boolean`` Series (unknown -> NA)."""
    return values.map(parse_flag).astype("boolean")
