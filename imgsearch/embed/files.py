"""Embedding files: one self-describing Parquet file per run (or one shard per partition).

Schema: a string column ``image_id`` and a ``fixed_size_list<float32>[D]`` column ``embedding``,
written in row groups; the schema metadata records ``imgsearch.embedding_dim`` (and optional keys
such as the extractor fingerprint, see :func:`embeddings_metadata`). Readable by pandas, DuckDB or
Spark as well as by :func:`load_embeddings`; shards written by a partition-wise runner share the
schema, so a folder of them reads as one table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgsearch import schema

log = logging.getLogger(__name__)

EMBEDDING_COLUMN = "embedding"
_PARQUET_ROWS_PER_GROUP = 16_384


def save_embeddings(
    path: Path,
    ids: Sequence[str] | np.ndarray,
    emb: np.ndarray,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``ids`` and ``emb`` ``(N, D)`` float32 to Parquet (see the module docstring).

    ``metadata`` (str -> str) is stored in the schema as ``imgsearch.<key>``. Raises
    ``ValueError`` on mismatched lengths, duplicate ids or a non-2-D array.
    """
    ids_list = [str(i) for i in ids]
    if emb.ndim != 2 or emb.shape[0] != len(ids_list):
        raise ValueError(f"embeddings shape {emb.shape} does not match {len(ids_list)} ids")
    if len(set(ids_list)) != len(ids_list):
        raise ValueError("image ids are not unique")
    dim = int(emb.shape[1])
    meta = {b"imgsearch.embedding_dim": str(dim).encode()}
    meta.update({f"imgsearch.{k}".encode(): str(v).encode() for k, v in (metadata or {}).items()})
    arrow_schema = pa.schema(
        [
            pa.field(schema.IMAGE_ID, pa.string()),
            pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32(), dim)),
        ],
        metadata=meta,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, arrow_schema) as writer:
        for start in range(0, max(len(ids_list), 1), _PARQUET_ROWS_PER_GROUP):
            block = np.ascontiguousarray(
                emb[start : start + _PARQUET_ROWS_PER_GROUP], dtype=np.float32
            )
            values = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), dim)
            ids_block = pa.array(
                ids_list[start : start + _PARQUET_ROWS_PER_GROUP], type=pa.string()
            )
            writer.write_table(pa.Table.from_arrays([ids_block, values], schema=arrow_schema))
    return path


def load_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a :func:`save_embeddings` file -> ``(ids (N,) object str, emb (N, D) float32)``."""
    table = pq.read_table(path, columns=[schema.IMAGE_ID, EMBEDDING_COLUMN])
    column = table.column(EMBEDDING_COLUMN)
    if not pa.types.is_fixed_size_list(column.type):
        raise ValueError(
            f"{path}: column {EMBEDDING_COLUMN!r} is {column.type}, not a fixed-size list"
        )
    dim = column.type.list_size
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    emb = np.ascontiguousarray(values, dtype=np.float32).reshape(len(table), dim)
    ids = np.asarray(table.column(schema.IMAGE_ID).to_pylist(), dtype=object)
    return ids, emb


def embeddings_metadata(path: Path) -> dict[str, str]:
    """The ``imgsearch.*`` schema metadata of an embeddings file (without the prefix)."""
    meta = pq.read_schema(path).metadata or {}
    prefix = b"imgsearch."
    return {k[len(prefix) :].decode(): v.decode() for k, v in meta.items() if k.startswith(prefix)}
