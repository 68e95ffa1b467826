"""The writer of batch extraction: accumulates ids and vectors, then writes the embeddings file.

Rows go, in manifest order, into an array of ``N`` rows allocated up front, or into an ``.npy``
memmap (``out=``), so memory does not grow while the pass runs. :meth:`EmbeddingWriter.save`
writes what was accumulated as an embeddings file (:mod:`imgsearch.embed.files`): the whole run,
or one shard per partition with the same schema.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from imgsearch.embed.files import save_embeddings

log = logging.getLogger(__name__)


class EmbeddingWriter:
    """Appends rows in order into ``n`` preallocated rows (memory or an ``.npy`` memmap)."""

    def __init__(self, n: int, dim: int, out: Path | None = None) -> None:
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            self.array: np.ndarray = np.lib.format.open_memmap(
                out, mode="w+", dtype=np.float32, shape=(n, dim)
            )
        else:
            self.array = np.empty((n, dim), dtype=np.float32)
        self.ids: list[str] = []

    def write(self, ids: list[str], rows: np.ndarray) -> None:
        start = len(self.ids)
        self.array[start : start + len(ids)] = rows
        self.ids.extend(ids)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (N_ok,) object str, embeddings (N_ok, D) float32)``: the rows written so far."""
        if isinstance(self.array, np.memmap):
            self.array.flush()
        return np.asarray(self.ids, dtype=object), self.array[: len(self.ids)]

    def save(self, path: Path, metadata: Mapping[str, str] | None = None) -> Path:
        """Write the rows so far as an embeddings file (see :func:`save_embeddings`)."""
        ids, emb = self.finish()
        return save_embeddings(path, ids, emb, metadata)
