"""The sections of the EDA report: each reads the manifest (or its items) and returns HTML.

A section whose data the catalog lacks says so (:data:`NOT_IN_CATALOG`) instead of going missing.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from imgsearch import schema
from imgsearch.data import imageio
from imgsearch.data.eda.metrics import _attribute_columns, _split_tags
from imgsearch.data.eda.plots import (
    COLOR,
    TOP_BARS,
    _barh,
    _bars_or_sentence,
    _figure,
    _log_axis,
    _log_hist,
    _png,
)
from imgsearch.data.eda.render import (
    NOT_IN_CATALOG,
    _fmt,
    _labels,
    _note,
    _pct,
    _present,
    _Section,
    _short,
    _table,
)

log = logging.getLogger(__name__)

THUMB_PX = 64

# --- sections -----------------------------------------------------------------------------------


def _summary(manifest: pd.DataFrame, items: pd.DataFrame, metrics: dict[str, float]) -> _Section:
    rows: list[tuple[str, str]] = [
        ("Images", _fmt(metrics["n_images"])),
        ("Items", _fmt(metrics["n_items"])),
        (
            "Categories",
            _fmt(metrics["n_categories"]) if _present(items, schema.CATEGORY) else NOT_IN_CATALOG,
        ),
    ]
    if _present(items, schema.SUBCATEGORY):
        rows.append(("Subcategories", _fmt(metrics["n_subcategories"])))
    if metrics["n_items"]:
        rows.append(
            (
                "Images per item (mean / median / min / max)",
                " / ".join(
                    _fmt(metrics[f"images_per_item_{s}"]) for s in ("mean", "median", "min", "max")
                ),
            )
        )
    rows.append(
        (
            "Quarantined files",
            f"{_fmt(metrics['n_quarantined'])} ({_pct(metrics['quarantine_rate'])} of all files seen)",
        )
    )
    if "nsfw_share" in metrics:
        rows.append(("NSFW share of items", _pct(metrics["nsfw_share"])))
    shares = sorted(
        (
            (k[len("format_share_") :], v)
            for k, v in metrics.items()
            if k.startswith("format_share_")
        )
    )
    if shares:
        rows.append(("File formats", ", ".join(f"{f.upper()} {v:.0%}" for f, v in shares)))
    for column in (schema.DOWNLOADS, schema.LIKES):
        key = f"{column}_median"
        rows.append(
            (
                f"{column.capitalize()} (median per item)",
                _fmt(metrics[key]) if key in metrics else NOT_IN_CATALOG,
            )
        )
    summary = pd.DataFrame(rows, columns=["figure", "value"])

    coverage = []
    for column in schema.ITEM_ATTRIBUTES:
        filled = 0 if column not in items.columns else int(_labels(items[column], "").ne("").sum())
        share = filled / len(items) if len(items) else 0.0
        coverage.append(
            (column, f"{filled:,}", f"{share:.0%}" if column in items.columns else "no column")
        )
    cov = pd.DataFrame(coverage, columns=["item attribute", "items with a value", "share"])
    body = (
        '<div class="cols"><div>' + _table(summary) + "</div><div>" + _table(cov) + "</div></div>"
    )
    return _Section("summary", "Summary", body)


def _categories(items: pd.DataFrame, manifest: pd.DataFrame, out_dir: Path) -> _Section:
    if not _present(items, schema.CATEGORY):
        return _Section("categories", "Items by category", _note(NOT_IN_CATALOG))
    counts = _labels(items[schema.CATEGORY]).value_counts()
    img = _png(_barh(counts, "items"), out_dir, "categories")
    images = _labels(manifest[schema.CATEGORY]).value_counts()
    table = pd.DataFrame(
        {"items": counts, "images": images.reindex(counts.index).fillna(0).astype(int)}
    )
    table["share of items"] = (table["items"] / table["items"].sum()).map("{:.1%}".format)
    if _present(items, schema.SUBCATEGORY):
        subs = (
            items.assign(_c=_labels(items[schema.CATEGORY]))
            .groupby("_c")[schema.SUBCATEGORY]
            .nunique()
        )
        table["subcategories"] = subs.reindex(table.index).fillna(0).astype(int)
    table.index.name = "category"
    return _Section("categories", "Items by category", img + _table(table.reset_index()))


def _subcategories(items: pd.DataFrame, out_dir: Path) -> _Section:
    title = "Labels: subcategories"
    if not _present(items, schema.SUBCATEGORY):
        return _Section("subcategories", title, _note(NOT_IN_CATALOG))
    counts = _labels(items[schema.SUBCATEGORY]).value_counts()
    img = _png(_barh(counts, "items"), out_dir, "subcategories")
    text = (
        f"{len(counts):,} subcategories; items per subcategory: median {_fmt(float(counts.median()))}, "
        f"min {_fmt(float(counts.min()))}, max {_fmt(float(counts.max()))}; "
        f"subcategories with a single item: {int((counts < 2).sum()):,}."
    )
    return _Section("subcategories", title, img + _note(text))


def _count_distribution(items: pd.DataFrame, column: str, out_dir: Path) -> _Section:
    title = f"{column.capitalize()} per item"
    if not _present(items, column):
        return _Section(column, title, _note(NOT_IN_CATALOG))
    values = pd.to_numeric(items[column], errors="coerce").dropna()
    if values.empty:
        return _Section(column, title, _note("The column holds no numbers."))
    fig, text = _log_hist(values, column)
    return _Section(column, title, _png(fig, out_dir, column) + _note(text))


def _nsfw(items: pd.DataFrame, out_dir: Path) -> _Section:
    if not _present(items, schema.NSFW):
        return _Section("nsfw", "NSFW share", _note(NOT_IN_CATALOG))
    flags = schema.parse_flags(items[schema.NSFW])
    counts = pd.Series(
        {
            "safe": int((flags == False).sum()),  # noqa: E712 - nullable boolean comparison
            "NSFW": int((flags == True).sum()),  # noqa: E712
            "unknown": int(flags.isna().sum()),
        }
    )
    counts = counts[counts > 0]
    return _Section("nsfw", "NSFW share", _png(_barh(counts, "items"), out_dir, "nsfw"))


def _formats(manifest: pd.DataFrame, out_dir: Path) -> _Section:
    if not _present(manifest, schema.FORMAT):
        return _Section(
            "formats", "File formats", _note("Not in this manifest (the validate stage adds it).")
        )
    formats = _labels(manifest[schema.FORMAT]).value_counts()
    body = _bars_or_sentence(formats, "images", out_dir, "formats", len(manifest))
    if _present(manifest, schema.FIXES):
        codes = manifest[schema.FIXES].dropna().astype(str).str.split(";").explode().str.strip()
        codes = codes[codes != ""]
        body += "<h3>Fixes applied by validation</h3>"
        if len(codes):
            body += _bars_or_sentence(
                codes.value_counts(), "images", out_dir, "fixes", len(manifest)
            )
        else:
            body += _note("No image needed a fix during validation.")
    return _Section("formats", "File formats", body)


def _sizes(manifest: pd.DataFrame, out_dir: Path) -> _Section:
    title = "Image sizes"
    if not (_present(manifest, schema.WIDTH) and _present(manifest, schema.HEIGHT)):
        return _Section("sizes", title, _note("Not in this manifest (the validate stage adds it)."))
    wh = pd.DataFrame(
        {
            "width": pd.to_numeric(manifest[schema.WIDTH], errors="coerce"),
            "height": pd.to_numeric(manifest[schema.HEIGHT], errors="coerce"),
        }
    ).dropna()
    pairs = wh.value_counts().rename("images").reset_index()
    if len(pairs) == 1:
        w, h = int(pairs["width"].iloc[0]), int(pairs["height"].iloc[0])
        return _Section("sizes", title, _note(f"All {len(wh):,} images are {w} x {h} px."))
    fig, ax = _figure(height=4.2, width=5.6)
    area = 20 + 400 * np.sqrt(pairs["images"] / pairs["images"].max())
    ax.scatter(pairs["width"], pairs["height"], s=area, color=COLOR, alpha=0.55, edgecolor="white")
    lo = float(min(wh["width"].min(), wh["height"].min()))
    hi = float(max(wh["width"].max(), wh["height"].max()))
    log_scale = hi / max(lo, 1) > 20
    if log_scale:
        limits = (max(0.5, lo / 1.5), hi * 1.5)
    else:
        pad = max(4.0, 0.08 * (hi - lo))
        limits = (max(0.5, lo - pad), hi + pad)
    ax.plot(limits, limits, color="#999", linewidth=0.8, linestyle=":", label="square")
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)
    if log_scale:
        _log_axis(ax.xaxis)
        _log_axis(ax.yaxis)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    top = pairs.head(8).astype(int)
    top["share"] = (top["images"] / len(wh)).map("{:.1%}".format)
    text = (
        f"Marker area grows with the number of images of that size. {len(pairs):,} distinct sizes; "
        f"{(wh['width'] == wh['height']).mean():.0%} of images are square."
    )
    return _Section("sizes", title, _png(fig, out_dir, "sizes") + _note(text) + _table(top))


def _images_per_item(per_item: pd.Series, out_dir: Path) -> _Section:
    title = "Images per item"
    if per_item.empty:
        return _Section("images_per_item", title, _note("No images."))
    fig, ax = _figure(height=3.0)
    counts = per_item.value_counts().sort_index()
    bars = ax.bar(counts.index.astype(int), counts.to_numpy(), color=COLOR, width=0.6)
    ax.bar_label(bars, labels=[f"{v:,}" for v in counts.to_numpy()], padding=2, fontsize=8)
    ax.set_xlabel("images of the item")
    ax.set_ylabel("items")
    if len(counts) <= 30:
        ax.set_xticks(counts.index.astype(int))
        ax.set_xlim(counts.index.min() - 0.8, counts.index.max() + 0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _Section("images_per_item", title, _png(fig, out_dir, "images_per_item"))


def _quarantine(quarantine: pd.DataFrame, out_dir: Path) -> _Section:
    title = "Quarantine: why files were rejected"
    if quarantine.empty:
        return _Section("quarantine", title, _note("No file was quarantined."))
    stage = _labels(quarantine.get(schema.STAGE, pd.Series(["?"] * len(quarantine))), "?")
    reason = _labels(quarantine.get(schema.REASON, pd.Series(["?"] * len(quarantine))), "?")
    counts = (stage + ": " + reason).value_counts()
    img = _png(_barh(counts, "files"), out_dir, "quarantine")
    columns = [
        c
        for c in (schema.IMAGE_ID, schema.URI, schema.STAGE, schema.REASON, schema.DETAIL)
        if c in quarantine
    ]
    examples = quarantine[columns].head(20).copy()
    if schema.DETAIL in examples:
        examples[schema.DETAIL] = examples[schema.DETAIL].astype(str).map(lambda s: _short(s, 90))
    return _Section("quarantine", title, img + "<h3>First rejected files</h3>" + _table(examples))


def _attributes(manifest: pd.DataFrame, out_dir: Path) -> _Section:
    title = "Image attributes"
    columns = _attribute_columns(manifest)
    if not columns:
        return _Section("attributes", title, _note("No other image attribute in this catalog."))
    body = ""
    for column in columns:
        key = f"attribute_{''.join(c if c.isalnum() else '_' for c in column)}"
        counts = _labels(manifest[column]).value_counts()
        body += f"<h3>{html.escape(column)}</h3>" + _bars_or_sentence(
            counts, "images", out_dir, key, len(manifest)
        )
    return _Section("attributes", title, body)


def _tags(items: pd.DataFrame, out_dir: Path) -> _Section:
    if not _present(items, schema.TAGS):
        return _Section("tags", "Tags", _note(NOT_IN_CATALOG))
    tags = pd.Series([t for v in items[schema.TAGS] for t in _split_tags(v)], dtype="object")
    if tags.empty:
        return _Section("tags", "Tags", _note("No tag could be read."))
    counts = tags.value_counts()
    img = _png(_barh(counts.head(TOP_BARS), "items"), out_dir, "tags")
    return _Section(
        "tags",
        "Tags",
        img + _note(f"{len(counts):,} distinct tags; the {min(len(counts), TOP_BARS)} most used."),
    )


def _created(items: pd.DataFrame, out_dir: Path) -> _Section:
    title = "Items over time"
    if not _present(items, schema.CREATED_AT):
        return _Section("created_at", title, _note(NOT_IN_CATALOG))
    when = pd.to_datetime(items[schema.CREATED_AT], errors="coerce", utc=True).dropna()
    if when.empty:
        return _Section("created_at", title, _note("No date could be read."))
    monthly = when.dt.tz_localize(None).dt.to_period("M").value_counts().sort_index()
    fig, ax = _figure(height=3.0)
    ax.bar(monthly.index.to_timestamp(), monthly.to_numpy(), width=25, color=COLOR)
    ax.set_ylabel("items created per month")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    text = f"From {when.min():%Y-%m-%d} to {when.max():%Y-%m-%d}."
    return _Section("created_at", title, _png(fig, out_dir, "created_at") + _note(text))


def _thumbnails(manifest: pd.DataFrame, limit: int) -> _Section:
    """A few images, one per category where possible, so a reader sees what the data looks like."""
    title = "Sample images"
    if not _present(manifest, schema.PATH):
        return _Section("samples", title, _note("No image paths in this manifest."))
    ordered = manifest.sort_values(schema.IMAGE_ID, kind="stable")
    if _present(ordered, schema.CATEGORY):
        ordered = ordered.assign(_c=_labels(ordered[schema.CATEGORY]))
        ordered = ordered.assign(_rank=ordered.groupby("_c").cumcount()).sort_values(
            ["_rank", "_c"], kind="stable"
        )
    cells: list[str] = []
    for _, row in ordered.head(limit * 2).iterrows():
        if len(cells) >= limit:
            break
        try:
            img = imageio.open_rgb(str(row[schema.PATH]))
            img.thumbnail((THUMB_PX * 2, THUMB_PX * 2))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
        except Exception as exc:  # noqa: BLE001 - a sample that fails to open is skipped, not fatal
            log.debug("eda: no thumbnail for %s: %s", row[schema.IMAGE_ID], exc)
            continue
        caption = " \u00b7 ".join(
            _short(str(row[c]), 24)
            for c in (schema.ITEM_NAME, schema.CATEGORY)
            if c in row.index and pd.notna(row[c]) and str(row[c]).strip()
        ) or str(row[schema.IMAGE_ID])
        encoded = base64.b64encode(buf.getvalue()).decode("ascii")
        cells.append(
            f'<figure><img src="data:image/png;base64,{encoded}" alt=""><figcaption>{html.escape(caption)}'
            "</figcaption></figure>"
        )
    if not cells:
        return _Section("samples", title, _note("No image could be opened."))
    return _Section("samples", title, '<div class="thumbs">' + "".join(cells) + "</div>")
