"""HTML pieces of the EDA report: formatting, notes, tables and the page around the sections.

Catalog text is untrusted: every string that reaches the page goes through :func:`html.escape`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd

NOT_IN_CATALOG = "Not in this catalog."


@dataclass
class _Section:
    key: str
    title: str
    body: str


def _present(df: pd.DataFrame, column: str) -> bool:
    """The column exists and holds at least one non-empty value (absent attributes are empty columns)."""
    if column not in df.columns:
        return False
    values = df[column].dropna()
    if values.empty:
        return False
    return bool((values.astype(str).str.strip() != "").any())


def _labels(series: pd.Series, missing: str = "(none)") -> pd.Series:
    text = series.astype("object").where(series.notna(), missing).astype(str).str.strip()
    return text.where(text != "", missing)


def _short(text: str, limit: int = 38) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _table(df: pd.DataFrame, *, index: bool = False) -> str:
    return df.to_html(index=index, escape=True, border=0, classes="tbl", na_rep="")


def _fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def _pct(share: float) -> str:
    """A share as a percentage that does not round a small non-zero share to 0%."""
    return f"{share:.2%}" if 0 < share < 0.01 else f"{share:.1%}"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;background:#f4f5f7;margin:0}
main{max-width:1040px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:0 0 12px} h3{font-size:14px;margin:18px 0 6px;color:#444}
.meta{color:#666;margin:0 0 16px}
nav{margin:0 0 18px;display:flex;flex-wrap:wrap;gap:6px}
nav a{background:#fff;border:1px solid #dde;border-radius:14px;padding:2px 10px;color:#3b6ea8;text-decoration:none;font-size:12px}
section{background:#fff;border:1px solid #e3e5ea;border-radius:8px;padding:16px 20px;margin:0 0 16px}
.plot{max-width:100%;height:auto;display:block;margin:4px 0}
.note{color:#555;margin:6px 0}
.tbl{border-collapse:collapse;font-size:13px;margin:8px 0}
.tbl th,.tbl td{padding:4px 10px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:top}
.tbl th{background:#f7f8fa;font-weight:600}
.tbl tr:hover td{background:#fafbfc}
.cols{display:flex;flex-wrap:wrap;gap:24px}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(110px,1fr));gap:10px}
.thumbs figure{margin:0;text-align:center}
.thumbs img{width:64px;height:64px;object-fit:contain;image-rendering:auto}
.thumbs figcaption{font-size:11px;color:#555;word-break:break-word}
"""


def _page(title: str, sections: Sequence[_Section]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>"
        f'<h1>{html.escape(title)}</h1><p class="meta">Generated {stamp} by imgsearch.data.eda</p>'
        f"<nav>{nav}</nav>{body}</main></body></html>"
    )
