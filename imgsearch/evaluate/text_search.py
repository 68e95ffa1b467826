"""Text -> image evaluation on items the text side never saw (the honest protocol of the README).

For one split (``test`` by default; alignment fits on ``train`` and stops on ``val``):

- queries: each item's ``label`` texts, one query per (item, language, label), and separately
  its ``tags`` (all tag texts of an item in one language joined by ", ": one query per item and
  language); other kinds of text are not queries here;
- gallery: the split's images, image embeddings only (no text on the gallery side);
- relevant: the images of the query's item.

Figures per query kind and language: ``hit_at_1``, ``hit_at_10``, ``map_at_r`` (and the rest of
:mod:`imgsearch.evaluate.metrics`), with the chance level of the same queries and gallery beside
them (``chance_...``). Metric names: ``text_<kind>_<lang>_<metric>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.errors import ConfigError
from imgsearch.evaluate.cross_modal import chance_scores, cross_modal_scores, rank_cross
from imgsearch.evaluate.metrics import l2_normalise

QUERY_KINDS = ("label", "tags")
HEADLINE = ("hit_at_1", "hit_at_10", "map_at_r")
TOP = 5


@dataclass
class TextSearchResult:
    metrics: dict[str, float]
    per_query: pd.DataFrame  # item_id, lang, kind, query, hit_at_1, hit_at_10, ap_at_r, top ids


def text_queries(texts: pd.DataFrame, items: Sequence[str]) -> pd.DataFrame:
    """Label and tag-list queries of ``items``: columns item_id, lang, kind, query."""
    t = texts[texts[schema.ITEM_ID].astype(str).isin(set(map(str, items)))]
    labels = t[t["kind"] == "label"].rename(columns={"text": "query"})
    labels = labels.assign(kind="label")[[schema.ITEM_ID, "lang", "kind", "query"]]
    tags = (
        t[t["kind"] == "tag"]
        .groupby([schema.ITEM_ID, "lang"], sort=True)["text"]
        .agg(lambda s: ", ".join(dict.fromkeys(s)))
        .reset_index()
        .rename(columns={"text": "query"})
        .assign(kind="tags")
    )
    out = pd.concat([labels, tags[[schema.ITEM_ID, "lang", "kind", "query"]]], ignore_index=True)
    return out.astype(str).sort_values(["kind", "lang", schema.ITEM_ID], kind="stable")


def evaluate_text_search(
    encode: Callable[[Sequence[str]], np.ndarray],
    texts: pd.DataFrame,
    images: pd.DataFrame,
    emb: np.ndarray,
    split: str = "test",
    ks: Sequence[int] = (1, 10),
) -> TextSearchResult:
    """``encode`` maps texts into the image space; ``images`` (image_id, item_id, split) rows match ``emb``."""
    mask = (images[schema.SPLIT] == split).to_numpy()
    gallery = l2_normalise(np.asarray(emb, dtype=np.float32)[mask])
    gallery_items = images.loc[mask, schema.ITEM_ID].astype(str).to_numpy()
    gallery_ids = images.loc[mask, schema.IMAGE_ID].astype(str).to_numpy()
    if len(gallery) == 0:
        raise ConfigError(f"no {split!r} images to search: the text evaluation needs a gallery")
    queries = text_queries(texts, np.unique(gallery_items).tolist())
    metrics: dict[str, float] = {}
    rows = []
    for (kind, lang), group in queries.groupby(["kind", "lang"], sort=True):
        q = np.asarray(encode(group["query"].tolist()), dtype=np.float32)
        labels = group[schema.ITEM_ID].to_numpy()
        scores, per_query = cross_modal_scores(q, labels, gallery, gallery_items, ks)
        chance = chance_scores(labels, gallery_items, ks)
        prefix = f"text_{kind}_{lang}_"
        metrics.update({prefix + k: v for k, v in scores.items()})
        metrics.update({f"chance_{prefix}{k}": v for k, v in chance.items()})
        top = np.concatenate([o for o, _, _ in rank_cross(q, labels, gallery, gallery_items, TOP)])
        rows.append(
            group.assign(
                **{k: per_query[k] for k in ("hit_at_1", f"hit_at_{max(ks)}", "ap_at_r")},
                top_ids=[";".join(gallery_ids[o]) for o in top],
            )
        )
    per_query_df = pd.concat(rows, ignore_index=True) if rows else queries.assign(top_ids="")
    return TextSearchResult(metrics=metrics, per_query=per_query_df)


def headline(metrics: dict[str, float]) -> pd.DataFrame:
    """One row per (kind, lang): the headline figures and their chance level, for a table."""
    rows = []
    for key in sorted(metrics):
        if not key.startswith("text_") or not key.endswith("_map_at_r"):
            continue
        prefix = key[: -len("map_at_r")]
        kind, lang = prefix[len("text_") : -1].split("_", 1)
        row: dict[str, object] = {
            "kind": kind,
            "lang": lang,
            "n_queries": metrics.get(prefix + "n_queries"),
        }
        for name in HEADLINE:
            row[name] = metrics.get(prefix + name)
            row[f"chance_{name}"] = metrics.get(f"chance_{prefix}{name}")
        rows.append(row)
    return pd.DataFrame(rows)
