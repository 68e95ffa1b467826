"""app.captions: display attributes first, nothing empty, popularity only where the catalog has it."""

from __future__ import annotations

import math

import pandas as pd

from app.captions import caption, fmt, has_popularity


def test_caption_shows_present_attributes_and_scores() -> None:
    hit = {"vendor": "google", "category": "Animals", "subcategory": "", "score": 0.91234,
           "similarity": 0.9, "popularity": 0.0}  # fmt: skip
    cols = ("vendor", "category", "subcategory")
    assert caption(hit, cols, popularity=False) == "google · Animals · score 0.912 · sim 0.900"
    assert caption(hit, cols, popularity=True).endswith("· pop 0.000")
    assert caption({"score": 0.5, "category": math.nan}, cols, False) == "score 0.500 · sim -"


def test_popularity_needs_a_column_with_values() -> None:
    assert not has_popularity(pd.DataFrame({"image_id": ["a"]}))
    assert not has_popularity(pd.DataFrame({"downloads": [None, None]}))
    assert has_popularity(pd.DataFrame({"likes": [None, 3]}))
    assert fmt("x") == "-" and fmt(float("inf")) == "-" and fmt(1) == "1.000"
