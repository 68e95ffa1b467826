"""The reader of batch extraction: manifest rows -> batches of uint8 pixels, failures as rows.

A row whose ``pre_path`` was made with exactly the extractor's
:class:`~imgsearch.data.preprocess.PreprocessConfig` (the cache folder is named by
``PreprocessConfig.cache_key()``) is read from that ``.npy``; any other row is decoded from
``path`` with :func:`imgsearch.data.imageio.open_rgb` + :func:`imgsearch.data.preprocess.to_uint8`,
the same two calls that made the cache. A file that cannot be read becomes a failure row
(quarantine schema, ``stage="extract"``), never a silent drop.

:class:`ManifestReader` reads any slice of a manifest (the whole of it for the sequential runner,
one partition for a distributed one) through a ``DataLoader`` that may use worker processes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from imgsearch import schema
from imgsearch.data import imageio
from imgsearch.data.preprocess import PreprocessConfig, load_uint8, to_uint8
from imgsearch.errors import ImageRejected

log = logging.getLogger(__name__)

FAILURE_STAGE = "extract"


@dataclass
class ReadItem:
    """Row ``index`` of the manifest slice: its pixels, or why there are none."""

    index: int
    array: np.ndarray | None  # (S, S, 3) uint8
    from_cache: bool = False
    reason: str = ""
    detail: str = ""
    detected_format: str | None = None


class ImageDataset(Dataset[ReadItem]):
    """Reads row ``i`` as a ``(S, S, 3)`` uint8 array; never raises for a bad file."""

    def __init__(
        self, paths: Sequence[str | None], pre_paths: Sequence[str | None], cfg: PreprocessConfig
    ) -> None:
        self.paths = list(paths)
        self.pre_paths = list(pre_paths)
        self.cfg = cfg
        self.cache_key = cfg.cache_key()

    def __len__(self) -> int:
        return len(self.paths)

    def _cached(self, i: int) -> np.ndarray | None:
        pre = self.pre_paths[i]
        # The cache folder name is the key of the config that made the array: only an exact match
        # is the same preprocessing (size alone is not: resize policy, interpolation...).
        if not pre or Path(pre).parent.parent.name != self.cache_key:
            return None
        try:
            arr = load_uint8(pre)
        except (OSError, ValueError) as exc:
            log.debug("pre_path %s unreadable (%s); decoding the image instead", pre, exc)
            return None
        if arr.dtype != np.uint8 or arr.shape != (self.cfg.size, self.cfg.size, 3):
            return None
        return arr

    def __getitem__(self, i: int) -> ReadItem:
        cached = self._cached(i)
        if cached is not None:
            return ReadItem(i, cached, from_cache=True)
        path = self.paths[i]
        if not path:
            return ReadItem(i, None, reason="missing_file", detail="no path in the manifest")
        try:
            return ReadItem(i, to_uint8(imageio.open_rgb(path), self.cfg))
        except ImageRejected as exc:
            return ReadItem(
                i, None, reason=exc.reason, detail=exc.detail, detected_format=exc.detected_format
            )
        except FileNotFoundError as exc:
            return ReadItem(i, None, reason="missing_file", detail=str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad file is a failure row; the batch goes on
            return ReadItem(
                i, None, reason="extract_read_failed", detail=f"{type(exc).__name__}: {exc}"
            )


@dataclass
class Batch:
    """Readable rows stacked for the mapper; unreadable ones travel along as failures."""

    indices: list[int]  # rows of the manifest slice, in order
    pixels: torch.Tensor  # (B, S, S, 3) uint8
    n_cached: int
    failed: list[ReadItem]


def collate(items: list[ReadItem]) -> Batch:
    """Stack the readable items; the rest travel along as failures (never dropped)."""
    ok = [it for it in items if it.array is not None]
    failed = [it for it in items if it.array is None]
    if ok:
        pixels = torch.from_numpy(np.stack([it.array for it in ok if it.array is not None]))
    else:
        pixels = torch.empty((0, 0, 0, 3), dtype=torch.uint8)
    return Batch([it.index for it in ok], pixels, sum(it.from_cache for it in ok), failed)


def manifest_column(manifest: pd.DataFrame, name: str) -> list[str | None]:
    """``name`` as a list of non-empty str or None (all None when the column is absent)."""
    if name not in manifest.columns:
        return [None] * len(manifest)
    return [v if isinstance(v, str) and v else None for v in manifest[name]]


def failure_row(
    manifest: pd.DataFrame, i: int, reason: str, detail: str, fmt: str | None
) -> dict[str, object]:
    """The quarantine row of row ``i`` of ``manifest`` (see :func:`imgsearch.schema.quarantine_rows`)."""
    row = manifest.iloc[i]
    return {
        schema.IMAGE_ID: row[schema.IMAGE_ID],
        schema.ITEM_ID: row.get(schema.ITEM_ID),
        schema.URI: row.get(schema.URI),
        schema.STAGE: FAILURE_STAGE,
        schema.REASON: reason,
        schema.DETAIL: detail,
        schema.DETECTED_FORMAT: fmt,
    }


@dataclass
class ManifestReader:
    """Reads a manifest slice (``image_id``, ``path``, optional ``pre_path``) as :class:`Batch` es.

    Stateless apart from its settings, so a distributed runner can ship one to every partition.
    """

    preprocess: PreprocessConfig
    batch_size: int = 64
    num_workers: int = 0
    pin_memory: bool = False

    def __call__(self, manifest: pd.DataFrame) -> Iterable[Batch]:
        dataset = ImageDataset(
            manifest_column(manifest, schema.PATH),
            manifest_column(manifest, schema.PRE_PATH),
            self.preprocess,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
