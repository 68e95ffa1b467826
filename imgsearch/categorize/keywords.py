"""Keywords for every image: the catalog's keyword vocabulary ranked by text-image similarity.

The vocabulary is the distinct tag texts of the catalog (per language) used by at least
``min_items`` items; each keyword is embedded once into the image space by the aligned text
encoder, and each image gets its top-``k`` keywords by cosine similarity, with the scores. This
labels a collection that has no words of its own (a new folder of images) from the words of
another.

:func:`precision_at_k` measures it on held-out items: the share of an image's top-k keywords
that are among its own item's true tags (only items with at least one tag in the vocabulary
count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.evaluate.cross_modal import top_order
from imgsearch.evaluate.metrics import l2_normalise

KEYWORD_COLUMNS = (schema.IMAGE_ID, "lang", "rank", "keyword", "score")


def vocabulary(texts: pd.DataFrame, min_items: int = 2, kind: str = "tag") -> pd.DataFrame:
    """lang, keyword, n_items: tag texts (stripped, lower-cased) used by >= ``min_items`` items."""
    tags = texts[texts["kind"] == kind]
    words = tags.assign(keyword=tags["text"].astype(str).str.strip().str.lower())
    words = words[words["keyword"] != ""]
    counts = words.groupby(["lang", "keyword"])[schema.ITEM_ID].nunique().rename("n_items")
    out = counts[counts >= min_items].reset_index()
    return out.sort_values(["lang", "keyword"], kind="stable").reset_index(drop=True)


def image_keywords(
    image_ids: Sequence[str],
    emb: np.ndarray,
    vocab: pd.DataFrame,
    encode: Callable[[Sequence[str]], np.ndarray],
    k: int = 5,
    batch: int = 4096,
) -> pd.DataFrame:
    """Top-``k`` keywords per image and language, with cosine scores (columns KEYWORD_COLUMNS)."""
    x = l2_normalise(np.asarray(emb, dtype=np.float32))
    ids = np.asarray([str(i) for i in image_ids])
    parts = []
    for lang, words in vocab.groupby("lang", sort=True):
        kw = words["keyword"].to_numpy()
        v = l2_normalise(np.asarray(encode(kw.tolist()), dtype=np.float32))
        depth = min(int(k), len(kw))
        for start in range(0, len(x), batch):
            scores = x[start : start + batch] @ v.T
            order = top_order(-scores, depth)
            n = len(order)
            parts.append(
                pd.DataFrame(
                    {
                        schema.IMAGE_ID: np.repeat(ids[start : start + n], depth),
                        "lang": lang,
                        "rank": np.tile(np.arange(1, depth + 1), n),
                        "keyword": kw[order].ravel(),
                        "score": np.take_along_axis(scores, order, axis=1).ravel(),
                    }
                )
            )
    if not parts:
        return pd.DataFrame({c: [] for c in KEYWORD_COLUMNS})
    return pd.concat(parts, ignore_index=True)


def precision_at_k(
    keywords: pd.DataFrame,
    images: pd.DataFrame,
    texts: pd.DataFrame,
    vocab: pd.DataFrame,
    k: int = 5,
) -> dict[str, float]:
    """Mean precision@k per language over images whose item has a tag in the vocabulary."""
    tags = texts[texts["kind"] == "tag"].assign(
        keyword=lambda d: d["text"].astype(str).str.strip().str.lower()
    )
    known = tags.merge(vocab[["lang", "keyword"]], on=["lang", "keyword"])
    truth = set(
        zip(known[schema.ITEM_ID].astype(str), known["lang"], known["keyword"], strict=True)
    )
    has_tag = set(zip(known[schema.ITEM_ID].astype(str), known["lang"], strict=True))
    item_of = dict(
        zip(images[schema.IMAGE_ID].astype(str), images[schema.ITEM_ID].astype(str), strict=True)
    )
    top = keywords[keywords["rank"] <= k].copy()
    top["item"] = top[schema.IMAGE_ID].map(item_of)
    top = top[[(i, lang) in has_tag for i, lang in zip(top["item"], top["lang"], strict=True)]]
    top["hit"] = [
        (i, lang, w) in truth
        for i, lang, w in zip(top["item"], top["lang"], top["keyword"], strict=True)
    ]
    out: dict[str, float] = {}
    for lang, group in top.groupby("lang"):
        per_image = group.groupby(schema.IMAGE_ID)["hit"].sum() / k
        out[f"keywords_{lang}_precision_at_{k}"] = float(per_image.mean())
        out[f"keywords_{lang}_n_images"] = float(len(per_image))
    return out
