"""A data report for people: one self-contained HTML page, plus each plot as a PNG.

:func:`build_report` reads a manifest (one row per image) and the quarantine table and writes
``report.html`` (plots embedded as base64 PNG, inline CSS, no network) and ``<section>.png`` files
into ``out_dir``. Optional catalog attributes (downloads, likes, NSFW, ...) get their section only
when the catalog has them; otherwise the section says so. Catalog text is untrusted: every
string is HTML-escaped, and matplotlib's mathtext is off so a ``$`` in a label stays a ``$``.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from imgsearch import schema
from imgsearch.data import imageio
from imgsearch.errors import ConfigError

log = logging.getLogger(__name__)

NOT_IN_CATALOG = "Not in this catalog."
TOP_BARS = 25  # longer bar charts keep the top ones and fold the rest into "other"
THUMB_PX = 64
COLOR = "#3b6ea8"
ACCENT = "#d1495b"

#: Columns that are bookkeeping, not attributes worth a chart.
_KNOWN_COLUMNS = {
    schema.IMAGE_ID,
    schema.ITEM_ID,
    schema.URI,
    schema.PATH,
    *schema.ITEM_ATTRIBUTES,
    schema.SHA256,
    schema.FORMAT,
    schema.WIDTH,
    schema.HEIGHT,
    schema.FIXES,
    schema.PHASH,
    schema.PRE_PATH,
}
_MAX_ATTRIBUTE_VALUES = (
    60  # a column with more distinct values is an id or free text, not an attribute
)


@dataclass
class EdaConfig:
    """``title`` heads the page; ``thumbnails`` sample images are shown (0 = none)."""

    title: str = "imgsearch data report"
    thumbnails: int = 30

    def __post_init__(self) -> None:
        if (
            isinstance(self.thumbnails, bool)
            or not isinstance(self.thumbnails, int)
            or self.thumbnails < 0
        ):
            raise ConfigError(f"EdaConfig.thumbnails must be an int >= 0, got {self.thumbnails!r}")


@dataclass
class _Section:
    key: str
    title: str
    body: str


# --- small helpers ------------------------------------------------------------------------------


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


def _figure(height: float = 3.6, width: float = 7.5) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=9)
    return fig, ax


def _png(fig: Figure, out_dir: Path, key: str) -> str:
    """Save ``fig`` as ``out_dir/<key>.png`` and return an ``<img>`` tag with it embedded."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    data = buf.getvalue()
    (out_dir / f"{key}.png").write_bytes(data)
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="plot" alt="{html.escape(key)}" src="data:image/png;base64,{encoded}">'


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


def _barh(counts: pd.Series, xlabel: str, *, top: int = TOP_BARS) -> Figure:
    """Horizontal bars, largest first, each labelled with its count and share."""
    counts = counts.sort_values(ascending=False)
    total = float(counts.sum())
    rest = counts.iloc[top:]
    counts = counts.iloc[:top]
    fig, ax = _figure(height=max(1.6, 0.6 + 0.27 * len(counts)))
    if len(rest):
        # A folded "other" bar would dwarf the rest: say it in words instead.
        ax.set_title(
            f"top {len(counts)} of {len(counts) + len(rest)}; the other {len(rest)} hold "
            f"{int(rest.sum()):,} ({rest.sum() / total:.0%})",
            loc="left",
            fontsize=9,
            color="#555",
        )
    labels = [_short(str(k)) for k in counts.index][::-1]
    values = counts.to_numpy(dtype=float)[::-1]
    bars = ax.barh(labels, values, color=COLOR)
    ax.bar_label(
        bars,
        labels=[f"{int(v):,}  ({v / total:.0%})" for v in values],
        padding=3,
        fontsize=8,
        color="#333",
    )
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, values.max() * 1.22 if len(values) else 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return fig


def _bars_or_sentence(counts: pd.Series, unit: str, out_dir: Path, key: str, total: int) -> str:
    """A bar chart, or one sentence when there is a single value (a lone 100% bar says less)."""
    if len(counts) == 1:
        value, count = str(counts.index[0]), int(counts.iloc[0])
        share = (
            f"all {total:,}"
            if count == total
            else f"{count:,} of {total:,} ({_pct(count / total)})"
        )
        return _note(f"{value}: {share} {unit}.")
    return _png(_barh(counts, unit), out_dir, key)


def _log_axis(axis: Any) -> None:
    """Log scale with plain tick labels (1, 10, 1,000): mathtext, used by the default labels, is off."""
    axis.axes.set_xscale("log") if axis.axis_name == "x" else axis.axes.set_yscale("log")
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _log_hist(values: pd.Series, xlabel: str) -> tuple[Figure, str]:
    """Histogram of a count-like variable on a log x axis; zeros are reported, not plotted."""
    positive = values[values > 0]
    zeros = int((values == 0).sum())
    fig, ax = _figure()
    if len(positive):
        lo, hi = float(positive.min()), float(positive.max())
        bins = np.logspace(np.log10(lo), np.log10(hi if hi > lo else lo * 10), 30)
        ax.hist(positive, bins=bins.tolist(), color=COLOR, edgecolor="white", linewidth=0.5)
        _log_axis(ax.xaxis)
        median = float(values.median())
        if median > 0:
            ax.axvline(
                median, color=ACCENT, linestyle="--", linewidth=1.2, label=f"median {_fmt(median)}"
            )
            ax.legend(frameon=False, fontsize=8)
    ax.set_xlabel(f"{xlabel} (log scale)")
    ax.set_ylabel("items")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    stats = values.describe(percentiles=[0.5, 0.9, 0.99])
    text = (
        f"{len(values):,} items with a value; min {_fmt(stats['min'])}, median {_fmt(stats['50%'])}, "
        f"p90 {_fmt(stats['90%'])}, p99 {_fmt(stats['99%'])}, max {_fmt(stats['max'])}"
        + (f"; {zeros:,} items at 0 are not on the log axis." if zeros else ".")
    )
    return fig, text


def _split_tags(value: Any) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(t).strip() for t in value if str(t).strip()]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    text = str(value)
    for sep in ("|", ";"):
        text = text.replace(sep, ",")
    return [t.strip() for t in text.split(",") if t.strip()]


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


def _attribute_columns(manifest: pd.DataFrame) -> list[str]:
    out = []
    for column in manifest.columns:
        if column in _KNOWN_COLUMNS or not _present(manifest, column):
            continue
        values = manifest[column].dropna()
        try:
            distinct = values.nunique()
        except TypeError:  # unhashable cells (lists): not a categorical attribute
            continue
        if 1 <= distinct <= _MAX_ATTRIBUTE_VALUES:
            out.append(column)
    return out


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


# --- metrics and the page -----------------------------------------------------------------------


def _items(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per item with its attributes (the first image's values)."""
    if schema.ITEM_ID not in manifest.columns:
        raise ValueError("manifest has no 'item_id' column")
    return manifest.drop_duplicates(schema.ITEM_ID, keep="first").reset_index(drop=True)


def report_metrics(manifest: pd.DataFrame, quarantine: pd.DataFrame) -> dict[str, float]:
    """The key figures of the report, as numbers."""
    items = _items(manifest)
    per_item = manifest.groupby(schema.ITEM_ID).size()
    n_images, n_quarantined = len(manifest), len(quarantine)
    seen = n_images + n_quarantined
    metrics: dict[str, float] = {
        "n_images": float(n_images),
        "n_items": float(len(items)),
        "n_categories": float(items[schema.CATEGORY].nunique())
        if _present(items, schema.CATEGORY)
        else 0.0,
        "n_subcategories": float(items[schema.SUBCATEGORY].nunique())
        if _present(items, schema.SUBCATEGORY)
        else 0.0,
        "n_quarantined": float(n_quarantined),
        "quarantine_rate": n_quarantined / seen if seen else 0.0,
    }
    if len(per_item):
        metrics.update(
            images_per_item_mean=float(per_item.mean()),
            images_per_item_median=float(per_item.median()),
            images_per_item_min=float(per_item.min()),
            images_per_item_max=float(per_item.max()),
        )
    if _present(items, schema.NSFW):
        flags = schema.parse_flags(items[schema.NSFW]).dropna()
        if len(flags):
            metrics["nsfw_share"] = float(flags.mean())
    for column in (schema.DOWNLOADS, schema.LIKES):
        if _present(items, column):
            values = pd.to_numeric(items[column], errors="coerce").dropna()
            if len(values):
                metrics[f"{column}_median"] = float(values.median())
                metrics[f"{column}_mean"] = float(values.mean())
    if _present(manifest, schema.FORMAT):
        shares = _labels(manifest[schema.FORMAT]).str.lower().value_counts(normalize=True)
        metrics.update({f"format_share_{fmt}": float(v) for fmt, v in shares.items()})
    return metrics


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


def build_report(
    manifest: pd.DataFrame,
    quarantine: pd.DataFrame,
    out_dir: Path,
    cfg: EdaConfig | None = None,
) -> tuple[Path, dict[str, float]]:
    """Write ``out_dir/report.html`` and one PNG per plot; return the report's path and key figures.

    ``manifest`` needs ``image_id`` and ``item_id``; everything else is optional and reported
    when present. Raises ``ValueError`` when a required column is missing.
    """
    for column in (schema.IMAGE_ID, schema.ITEM_ID):
        if column not in manifest.columns:
            raise ValueError(f"manifest has no {column!r} column")
    cfg = cfg or EdaConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quarantine = quarantine if quarantine is not None else schema.empty_quarantine()
    items = _items(manifest)
    metrics = report_metrics(manifest, quarantine)

    # Figures are built on matplotlib.figure.Figure (no pyplot, no global figure state); the
    # rc_context only turns mathtext off for catalog labels while they are drawn.
    with matplotlib.rc_context({"text.parse_math": False, "font.size": 9}):
        sections = [
            _summary(manifest, items, metrics),
            _categories(items, manifest, out_dir),
            _subcategories(items, out_dir),
            _images_per_item(manifest.groupby(schema.ITEM_ID).size(), out_dir),
            _count_distribution(items, schema.DOWNLOADS, out_dir),
            _count_distribution(items, schema.LIKES, out_dir),
            _nsfw(items, out_dir),
            _formats(manifest, out_dir),
            _sizes(manifest, out_dir),
            _attributes(manifest, out_dir),
            _tags(items, out_dir),
            _created(items, out_dir),
            _quarantine(quarantine, out_dir),
        ]
        if cfg.thumbnails:
            sections.append(_thumbnails(manifest, cfg.thumbnails))

    report = out_dir / "report.html"
    report.write_text(_page(cfg.title, sections), encoding="utf-8")
    log.info("eda: report with %d sections at %s", len(sections), report)
    return report, metrics
