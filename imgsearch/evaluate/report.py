"""The evaluation as a page a person reads: one self-contained HTML file (thumbnails inline).

What it holds: the headline figures with their meaning; a seeded sample of test queries with their
top results as thumbnails (a result of the query's own item outlined in green: relevant); the
worst queries (lowest AP) with theirs; the per-category figures as a table sorted by MAP@R and a
bar plot. Rows come from :func:`imgsearch.evaluate.retrieval.evaluate` (``per_query`` with
``top_ids``, ``per_category``).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from typing import Any

import pandas as pd

from imgsearch.evaluate.text_report import thumb_cell, thumbnail_b64

#: the headline figures and what they say, in the order the page shows them
MEANINGS = (
    ("map_at_r", "MAP@R: precision over the first R results, R = number of relevant images"),
    ("hit_at_1", "the top result is relevant (another image of the query's item)"),
    ("hit_at_10", "at least one relevant image in the top 10"),
    ("map", "mean average precision over the full ranking"),
    ("recall_at_10", "share of the relevant images found in the top 10"),
)
STYLE = (
    "body{font-family:sans-serif;margin:1.5em}td{padding:2px;text-align:center}"
    "table.fig td,table.fig th{padding:3px 10px;text-align:left;border-bottom:1px solid #ddd}"
    ".q{border:3px solid #36c}small{color:#555}"
)


def _figures(metrics: Mapping[str, Any]) -> str:
    rows = [
        f"<tr><td><b>{name}</b></td><td>{float(metrics[name]):.3f}</td>"
        f"<td>{html.escape(meaning)}</td></tr>"
        for name, meaning in MEANINGS
        if name in metrics
    ]
    n = metrics.get("n_queries")
    extra = f"<p>{int(n)} queries, gallery of {int(metrics.get('n_gallery', 0))}.</p>" if n else ""
    return f"<h2>Headline figures</h2>{extra}<table class='fig'>{''.join(rows)}</table>"


def _query_rows(
    rows: pd.DataFrame, paths: Mapping[str, str], items_of: Mapping[str, str]
) -> list[str]:
    out = []
    for _, row in rows.iterrows():
        qid, item = str(row["image_id"]), str(row["item_id"])
        data = thumbnail_b64(paths.get(qid))
        query = (
            f"<img class='q' width='64' title='{html.escape(qid)}' src='data:image/png;base64,{data}'>"
            if data
            else html.escape(qid)
        )
        ids = [i for i in str(row.get("top_ids", "")).split(";") if i]
        cells = "".join(thumb_cell(i, items_of.get(i, ""), item, paths) for i in ids)
        out.append(
            f"<tr><td>{query}<br><small>{html.escape(item)}<br>AP {float(row['ap']):.2f}"
            f"</small></td><td>&rarr;</td>{cells}</tr>"
        )
    return out


def _category_plot(table: pd.DataFrame, column: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = table.head(40)
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(shown) + 1.2), dpi=100)
    ax.barh(shown[column].astype(str)[::-1], shown["map_at_r"][::-1], color="#36c")
    ax.set_xlabel("MAP@R")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _categories(per_category: pd.DataFrame, column: str) -> str:
    if per_category.empty or "map_at_r" not in per_category.columns:
        return ""
    table = per_category.sort_values("map_at_r", ascending=False).reset_index(drop=True)
    key = column if column in table.columns else str(table.columns[0])
    cols = [c for c in (key, "n_queries", "map_at_r", "hit_at_1", "hit_at_10", "map") if c in table]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{v:.3f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
            for v in (row[c] for c in cols)
        )
        + "</tr>"
        for _, row in table.iterrows()
    )
    plot = _category_plot(table, key)
    return (
        "<h2>Per category (sorted by MAP@R)</h2>"
        f"<img src='data:image/png;base64,{plot}'>"
        f"<table class='fig'><tr>{head}</tr>{body}</table>"
    )


def evaluation_html(
    metrics: Mapping[str, Any],
    per_query: pd.DataFrame,
    per_category: pd.DataFrame,
    paths: Mapping[str, str],
    items_of: Mapping[str, str],
    title: str,
    *,
    n_examples: int = 12,
    n_worst: int = 12,
    seed: int = 0,
    category_column: str = "category",
) -> str:
    """The page (see the module docstring). ``paths``: image_id -> file; ``items_of``: image_id ->
    item_id of the gallery. ``per_query`` needs ``image_id``, ``item_id``, ``ap`` (``top_ids``
    for the thumbnails)."""
    parts = [
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _figures(metrics),
        "<p>Each row: a test query (blue), then its top results; "
        "<span style='border:3px solid #2a2'>green outline</span>: relevant.</p>",
    ]
    if len(per_query):
        sample = per_query.sample(n=min(n_examples, len(per_query)), random_state=seed)
        parts += ["<h2>Example queries</h2><table id='examples'>"]
        parts += _query_rows(sample, paths, items_of) + ["</table>"]
        worst = per_query.sort_values(["ap", "image_id"]).head(n_worst)
        parts += ["<h2>Worst queries (lowest AP)</h2><table id='worst'>"]
        parts += _query_rows(worst, paths, items_of) + ["</table>"]
    parts += [_categories(per_category, category_column), "</body></html>"]
    return "\n".join(parts)
