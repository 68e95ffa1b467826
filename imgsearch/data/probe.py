"""An out-of-domain probe: a folder of real images outside the catalog's domain, one category
per folder (``<root>/<category>/**/<file>``), to see whether fine-tuning forgot general features.

The probe is ranked with the catalog's own protocol (:func:`imgsearch.evaluate.retrieval.retrieval_scores`:
each image queries all the others, cosine, exact), relevant = same category. So ``item_id`` is
the category folder (that is what the protocol groups by) and ``category`` repeats it.

An icon theme fits: Debian's ``adwaita-icon-theme`` has ``/usr/share/icons/Adwaita/96x96/<context>/``
(actions, status, devices, categories, emotes, mimetypes, places, ui, emblems, legacy). Its
icons are mostly grey symbolic glyphs on transparency, composited on white like every image
(:func:`imgsearch.data.imageio.load_image`): black line art, far from the demo's colour emoji.

Listing is :func:`imgsearch.data.ingest_folder.ingest_folder` (hidden entries, symlinks out of
the root, files outside any folder become rejected rows). Then each file is fully decoded once;
a file that does not decode is a quarantine row with the decoder's reason, never a crash.
Byte-identical files are kept once (the first by ``image_id``; the others: reason
``duplicate``): the same icon filed under two contexts is noise no model can resolve.
Categories with fewer than ``min_per_category`` images left are dropped (reason
``small_category``). Rows are sorted by ``image_id``: the same folder gives the same probe.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from imgsearch import schema as S
from imgsearch.data.catalog import IngestConfig
from imgsearch.data.imageio import load_image, read_bytes
from imgsearch.data.ingest_folder import ingest_folder
from imgsearch.errors import ConfigError, ImageRejected, UnsafePathError
from imgsearch.paths import Resolver

log = logging.getLogger(__name__)

STAGE = "probe"


@dataclass(frozen=True)
class ProbeConfig:
    """``include``: category folders to keep (empty: all); ``exclude``: folders to leave out
    (e.g. Adwaita's ``apps``, one icon, and ``legacy``, a mixture of the other contexts).
    ``max_per_category``: keep the first n images (by ``image_id``) of each category; None = all."""

    min_per_category: int = 10
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    max_per_category: int | None = None
    dedupe: bool = True

    def __post_init__(self) -> None:
        if self.min_per_category < 2:
            raise ConfigError(f"probe.min_per_category must be >= 2, got {self.min_per_category}")
        if self.max_per_category is not None and self.max_per_category < self.min_per_category:
            raise ConfigError("probe.max_per_category must be None or >= min_per_category")


@dataclass
class Probe:
    """``manifest``: image_id, item_id (= category), uri, path (absolute), category, sha256;
    ``quarantine``: rejected rows (quarantine schema, stage ``probe``)."""

    manifest: pd.DataFrame
    quarantine: pd.DataFrame
    metrics: dict[str, float] = field(default_factory=dict)


def probe_catalog(root: Path, cfg: ProbeConfig | None = None) -> Probe:
    """The probe of folder ``root`` (see the module docstring). Raises
    :class:`~imgsearch.errors.CatalogError` when ``root`` is not a folder and
    :class:`~imgsearch.errors.ConfigError` when fewer than two categories are left."""
    cfg = cfg or ProbeConfig()
    root = Path(root).resolve()
    listed = ingest_folder(root, IngestConfig(data_root=str(root)))
    rejected: list[dict[str, object]] = []
    rows = listed.manifest[[S.IMAGE_ID, S.ITEM_ID, S.URI]].sort_values(S.IMAGE_ID, kind="stable")
    keep = rows[S.ITEM_ID].astype(str)
    mask = pd.Series(True, index=rows.index)
    if cfg.include:
        mask &= keep.isin([str(c) for c in cfg.include])
    if cfg.exclude:
        mask &= ~keep.isin([str(c) for c in cfg.exclude])
    rows = rows[mask]
    resolver = Resolver(root)
    good: list[dict[str, object]] = []
    seen: dict[str, str] = {}
    for row in rows.to_dict("records"):
        try:
            path = resolver.resolve(str(row[S.URI]))
            data = read_bytes(path)
            load_image(data, filename=path.name)
        except ImageRejected as exc:
            rejected.append(_reject(row, exc.reason, exc.detail, exc.detected_format))
            continue
        except UnsafePathError as exc:
            rejected.append(_reject(row, "unsafe_path", str(exc)))
            continue
        except OSError as exc:
            rejected.append(_reject(row, "unreadable", f"{type(exc).__name__}: {exc}"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if cfg.dedupe and digest in seen:
            rejected.append(_reject(row, "duplicate", f"same bytes as {seen[digest]}"))
            continue
        seen[digest] = str(row[S.IMAGE_ID])
        good.append({**row, S.PATH: str(path), S.CATEGORY: row[S.ITEM_ID], S.SHA256: digest})
    manifest = pd.DataFrame(
        good, columns=[S.IMAGE_ID, S.ITEM_ID, S.URI, S.PATH, S.CATEGORY, S.SHA256]
    )
    if cfg.max_per_category is not None:
        manifest = manifest.groupby(S.ITEM_ID, sort=False).head(cfg.max_per_category)
    counts = manifest[S.ITEM_ID].value_counts()
    small = set(counts[counts < cfg.min_per_category].index)
    for row in manifest[manifest[S.ITEM_ID].isin(small)].to_dict("records"):
        detail = f"category {row[S.ITEM_ID]!r} has {counts[row[S.ITEM_ID]]} < {cfg.min_per_category} images"
        rejected.append(_reject(row, "small_category", detail))
    manifest = manifest[~manifest[S.ITEM_ID].isin(small)].reset_index(drop=True)
    n_categories = manifest[S.ITEM_ID].nunique()
    if n_categories < 2:
        raise ConfigError(
            f"probe {root}: {n_categories} categories with >= {cfg.min_per_category} readable "
            "images; a probe needs two at least"
        )
    quarantine = pd.concat(
        [listed.rejected.assign(**{S.STAGE: STAGE}), S.quarantine_rows(rejected)],
        ignore_index=True,
    ).reindex(columns=list(S.QUARANTINE_COLUMNS))
    log.info(
        "probe %s: %d images in %d categories, %d rejected",
        root,
        len(manifest),
        n_categories,
        len(quarantine),
    )
    metrics = {
        "probe_n_images": float(len(manifest)),
        "probe_n_categories": float(n_categories),
        "probe_n_rejected": float(len(quarantine)),
    }
    return Probe(manifest=manifest, quarantine=quarantine, metrics=metrics)


def _reject(
    row: dict[str, object], reason: str, detail: str, detected: str | None = None
) -> dict[str, object]:
    return {
        S.IMAGE_ID: row[S.IMAGE_ID],
        S.ITEM_ID: row[S.ITEM_ID],
        S.URI: row[S.URI],
        S.STAGE: STAGE,
        S.REASON: reason,
        S.DETAIL: detail,
        S.DETECTED_FORMAT: detected,
    }
