"""A self-contained HTML gallery of a categorisation, the way a person reviews a collection.

One section per top-level category (name, where the name came from, keywords, size), then its
clusters, each with name, keywords, size, cohesion, purity where labels exist, and a row of
representative thumbnails (base64 WebP inside the page: it opens anywhere, from the MLflow UI or
a mail). Thumbnails are small (48 px WebP, about a third of a PNG's bytes) and capped per
cluster, so the page stays small; an unreadable image shows its id instead.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import pandas as pd

from imgsearch.evaluate.text_report import thumbnail_b64

STYLE = (
    "body{font-family:sans-serif;margin:1em}h2{margin-top:1.5em;border-bottom:1px solid #ccc}"
    ".cl{margin:.6em 0 .6em 1em}.kw{color:#555}.src{color:#888;font-size:80%}"
    "img{margin:1px;border:1px solid #ddd}.miss{display:inline-block;font-size:70%;color:#a00}"
)


def _fmt(value: object, spec: str = ".2f") -> str:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    return "" if number != number else format(number, spec)


def _header(row: Mapping[str, object], tag: str) -> str:
    purity = _fmt(row.get("purity"))
    extra = f", purity {purity}" if purity else ""
    keywords = str(row.get("keywords") or "").replace(";", ", ")
    return (
        f"<{tag}>{html.escape(str(row['name']))} "
        f"<span class='src'>[{html.escape(str(row['name_source']))}; "
        f"{_fmt(row.get('size'), '.0f')} images, cohesion {_fmt(row.get('cohesion'))}{extra}]</span></{tag}>"
        + (f"<div class='kw'>{html.escape(keywords)}</div>" if keywords else "")
    )


def _thumbs(ids: Sequence[str], paths: Mapping[str, str], size: int) -> str:
    cells = []
    for image_id in ids:
        data = thumbnail_b64(paths.get(image_id), size, fmt="WEBP")
        title = html.escape(image_id)
        if data:
            cells.append(
                f'<img title="{title}" width="{size}" src="data:image/webp;base64,{data}">'
            )
        else:
            cells.append(f"<span class='miss'>{title}</span>")
    return "".join(cells)


def gallery_html(
    categories: pd.DataFrame,
    paths: Mapping[str, str],
    thumbs_per_cluster: int = 8,
    thumb_px: int = 48,
    title: str = "categories",
) -> str:
    """The page for a ``categories`` table (one row per node: ``level`` category | cluster,
    ``cluster_id``, ``parent``, ``name``, ``name_source``, ``keywords``, ``size``, ``cohesion``,
    ``purity``, ``representatives`` (``;``-joined image ids)); ``paths``: image_id -> file."""
    top = categories[categories["level"] == "category"].sort_values("size", ascending=False)
    fine = categories[categories["level"] == "cluster"]
    parts = [
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p>{len(top)} categories, {len(fine)} clusters, {int(fine['size'].sum())} images. "
        "The source of each name is in brackets: labels (majority of labelled members), "
        "label_neighbours, keywords (c-TF-IDF) or cluster (no words: see the images).</p>",
    ]
    for _, cat in top.iterrows():
        parts.append(_header(cat.to_dict(), "h2"))
        members = fine[fine["parent"] == cat["cluster_id"]].sort_values("size", ascending=False)
        for _, row in members.iterrows():
            ids = [i for i in str(row.get("representatives") or "").split(";") if i]
            parts.append(
                "<div class='cl'>"
                + _header(row.to_dict(), "h4")
                + _thumbs(ids[:thumbs_per_cluster], paths, thumb_px)
                + "</div>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)
