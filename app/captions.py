"""Result captions for the search page: what a person needs to tell results apart, nothing empty.

Pure (no Streamlit): ``caption(hit, columns, has_popularity)`` joins the hit's display attributes
(``search.caption_columns``: the drawing's vendor, its category, ...) that are present and not
empty, then the score and the cosine similarity, and the popularity only when the catalog has
popularity columns (``downloads`` / ``likes``): a catalog without them shows no "pop 0.000".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from imgsearch import schema

POPULARITY_SOURCES = (schema.DOWNLOADS, schema.LIKES)


def fmt(value: Any) -> str:
    """A score with three decimals, or ``-`` for what is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return f"{number:.3f}" if math.isfinite(number) else "-"


def has_popularity(catalog: pd.DataFrame) -> bool:
    """True when the catalog has a popularity column with at least one value."""
    return any(c in catalog.columns and catalog[c].notna().any() for c in POPULARITY_SOURCES)


def _shown(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def caption(hit: Mapping[str, Any], columns: Iterable[str], popularity: bool) -> str:
    """``vendor · category · score 0.912 · sim 0.905`` (``· pop 0.300`` with popularity)."""
    parts = [v for v in (_shown(hit.get(c)) for c in columns) if v is not None]
    parts += [f"score {fmt(hit.get('score'))}", f"sim {fmt(hit.get('similarity'))}"]
    if popularity and fmt(hit.get("popularity")) != "-":
        parts.append(f"pop {fmt(hit.get('popularity'))}")
    return " · ".join(parts)
