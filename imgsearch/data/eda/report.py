"""A data report for people: one self-contained HTML page, plus each plot as a PNG.

:func:`build_report` reads a manifest (one row per image) and the quarantine table and writes
``report.html`` (plots embedded as base64 PNG, inline CSS, no network) and ``<section>.png`` files
into ``out_dir``. Optional catalog attributes (downloads, likes, NSFW, ...) get their section only
when the catalog has them; otherwise the section says so. Catalog text is untrusted: every
string is HTML-escaped, and matplotlib's mathtext is off so a ``$`` in a label stays a ``$``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd

from imgsearch import schema
from imgsearch.data.eda import sections as sec
from imgsearch.data.eda.metrics import _items, report_metrics
from imgsearch.data.eda.render import _page
from imgsearch.errors import ConfigError

log = logging.getLogger(__name__)


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
            sec._summary(manifest, items, metrics),
            sec._categories(items, manifest, out_dir),
            sec._subcategories(items, out_dir),
            sec._images_per_item(manifest.groupby(schema.ITEM_ID).size(), out_dir),
            sec._count_distribution(items, schema.DOWNLOADS, out_dir),
            sec._count_distribution(items, schema.LIKES, out_dir),
            sec._nsfw(items, out_dir),
            sec._formats(manifest, out_dir),
            sec._sizes(manifest, out_dir),
            sec._attributes(manifest, out_dir),
            sec._tags(items, out_dir),
            sec._created(items, out_dir),
            sec._quarantine(quarantine, out_dir),
        ]
        if cfg.thumbnails:
            sections.append(sec._thumbnails(manifest, cfg.thumbnails))

    report = out_dir / "report.html"
    report.write_text(_page(cfg.title, sections), encoding="utf-8")
    log.info("eda: report with %d sections at %s", len(sections), report)
    return report, metrics
