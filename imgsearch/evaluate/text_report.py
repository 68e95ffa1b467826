"""An HTML page of example text queries and their top results, thumbnails inline (one file).

Rows come from :class:`~imgsearch.evaluate.text_search.TextSearchResult.per_query`; a result of
the query's own item is outlined in green. Images are read with Pillow, shrunk to thumbnails and
embedded as base64 PNG, so the page opens anywhere (an MLflow artifact, a mail attachment).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping

import pandas as pd
from PIL import Image

THUMB = 64


def thumbnail_b64(path: str | None, size: int = THUMB, fmt: str = "PNG") -> str:
    """A base64 thumbnail (at most ``size`` px a side, in Pillow format ``fmt``) of the image at
    ``path``; "" if unreadable."""
    if not path:
        return ""
    try:
        with Image.open(path) as img:
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.convert("RGBA").save(buf, format=fmt)
    except (OSError, ValueError):
        return ""
    return base64.b64encode(buf.getvalue()).decode("ascii")


def thumb_cell(image_id: str, item: str, query_item: str, paths: Mapping[str, str]) -> str:
    """A table cell with the thumbnail of ``image_id``, outlined in green when relevant."""
    data = thumbnail_b64(paths.get(image_id))
    border = "3px solid #2a2" if item == query_item else "3px solid transparent"
    title = html.escape(f"{image_id} (item {item})")
    if not data:
        return f'<td title="{title}" style="border:{border}">{html.escape(image_id)}</td>'
    return (
        f'<td style="border:{border}"><img title="{title}" width="{THUMB}" '
        f'src="data:image/png;base64,{data}"></td>'
    )


def examples_html(
    per_query: pd.DataFrame,
    paths: Mapping[str, str],
    items_of: Mapping[str, str],
    per_group: int = 8,
    seed: int = 0,
) -> str:
    """``paths``: image_id -> file; ``items_of``: image_id -> item_id. A seeded sample per kind/lang."""
    parts = [
        "<html><head><meta charset='utf-8'><title>text search examples</title></head><body>",
        "<h1>Text -> image: example test queries</h1>",
        "<p>Green outline: an image of the item the query describes (relevant).</p>",
    ]
    for (kind, lang), group in per_query.groupby(["kind", "lang"], sort=True):
        sample = group.sample(n=min(per_group, len(group)), random_state=seed)
        parts.append(f"<h2>{html.escape(str(kind))} queries, {html.escape(str(lang))}</h2><table>")
        for _, row in sample.iterrows():
            ids = [i for i in str(row["top_ids"]).split(";") if i]
            cells = "".join(
                thumb_cell(i, items_of.get(i, ""), str(row["item_id"]), paths) for i in ids
            )
            parts.append(
                f"<tr><td style='max-width:18em'>{html.escape(str(row['query']))}"
                f"<br><small>AP@R {float(row['ap_at_r']):.2f}</small></td>{cells}</tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
