"""Figures of the EDA report: matplotlib ``Figure`` objects (no pyplot), saved as PNG and embedded."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from imgsearch.data.eda.render import _fmt, _note, _pct, _short

TOP_BARS = 25  # longer bar charts keep the top ones and fold the rest into "other"
COLOR = "#3b6ea8"
ACCENT = "#d1495b"


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
