"""Runs reader -> mapper -> writer over one slice of a manifest.

A :class:`Runner` is built from three builders (the clip-retrieval ``clip_inference`` shape):
``reader_builder()`` gives a :class:`~imgsearch.embed.reader.ManifestReader`, ``mapper_builder()``
a :class:`~imgsearch.embed.mapper.Mapper` (where the model is loaded), ``writer_builder(n)`` an
:class:`~imgsearch.embed.writer.EmbeddingWriter` for ``n`` rows. Calling the runner on a manifest
slice reads, maps and writes it and returns a :class:`PartitionResult`; nothing in it depends on
the other slices. :func:`imgsearch.embed.extract.extract` is the sequential runner (one slice: the
whole manifest); a distributed runner calls the same object once per partition and saves each
result with ``result.writer.save(shard_path)``: shards with the schema of the single file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.embed.mapper import Mapper
from imgsearch.embed.reader import Batch, ManifestReader, failure_row
from imgsearch.embed.writer import EmbeddingWriter

log = logging.getLogger(__name__)


@dataclass
class PartitionResult:
    """What one slice produced: the writer holding its rows, failure rows and counters."""

    writer: EmbeddingWriter
    failures: list[dict[str, object]] = field(default_factory=list)
    n_cached: int = 0
    n_read: int = 0
    mapper_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Runner:
    """reader -> mapper -> writer over a manifest slice (see the module docstring)."""

    reader_builder: Callable[[], ManifestReader]
    mapper_builder: Callable[[], Mapper]
    writer_builder: Callable[[int], EmbeddingWriter]

    def __call__(
        self, manifest: pd.DataFrame, progress: Callable[[int], object] | None = None
    ) -> PartitionResult:
        """Embed every row of ``manifest`` (``image_id``, ``path``, optional ``pre_path``).

        ``progress`` is called with the number of rows each batch settled.
        """
        manifest = manifest.reset_index(drop=True)
        reader = self.reader_builder()
        mapper = self.mapper_builder()
        result = PartitionResult(self.writer_builder(len(manifest)))
        image_ids = manifest[schema.IMAGE_ID].astype(str).tolist()
        with mapper.session():
            for batch in reader(manifest):
                _record_failures(manifest, image_ids, batch, result)
                if batch.indices:
                    _map_and_write(manifest, image_ids, batch, mapper, result)
                if progress is not None:
                    progress(len(batch.indices) + len(batch.failed))
        result.mapper_metrics = dict(mapper.metrics)
        return result


def _record_failures(
    manifest: pd.DataFrame, image_ids: list[str], batch: Batch, result: PartitionResult
) -> None:
    for item in batch.failed:
        result.failures.append(
            failure_row(manifest, item.index, item.reason, item.detail, item.detected_format)
        )
        log.warning("extract: %s failed (%s: %s)", image_ids[item.index], item.reason, item.detail)


def _map_and_write(
    manifest: pd.DataFrame,
    image_ids: list[str],
    batch: Batch,
    mapper: Mapper,
    result: PartitionResult,
) -> None:
    """Embed the batch; a non-finite or zero vector becomes a failure row, the rest is written."""
    emb = mapper(batch.pixels)
    finite = np.isfinite(emb).all(axis=1) & (np.linalg.norm(emb, axis=1) > 0.5)
    for j in np.flatnonzero(~finite):
        result.failures.append(
            failure_row(
                manifest, batch.indices[j], "bad_embedding", "non-finite or zero vector", None
            )
        )
    written = [image_ids[i] for i, ok in zip(batch.indices, finite, strict=True) if ok]
    result.writer.write(written, emb[finite])
    write_extras = getattr(result.writer, "write_extras", None)  # imgsearch.embed.extras
    if write_extras is not None:
        write_extras(written, getattr(mapper, "extras", None), finite)
    result.n_cached += batch.n_cached
    result.n_read += len(batch.indices)
