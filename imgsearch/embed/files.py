"""Embedding files: one self-describing Parquet file per run, or a folder of shards.

Schema: a string column ``image_id`` and a ``fixed_size_list<float32>[D]`` column ``embedding``,
written in row groups; the schema metadata records ``imgsearch.embedding_dim`` (and optional keys
such as the extractor fingerprint, see :func:`embeddings_metadata`). Readable by pandas, DuckDB or
Spark as well as by :func:`load_embeddings`.

A partition-wise runner (:mod:`imgsearch.embed.spark_runner`) writes a *folder* with the same
name (``embeddings.parquet/part-00000.parquet``, ...): one shard per partition, each with the
schema of the single file, in manifest order by file name. Names starting with ``.`` or ``_``
(temporary files, Spark's ``_SUCCESS``) are not shards. Every reader here takes either form:
:func:`load_embeddings` (all rows), :func:`iter_shards` (one shard at a time, for work that must
not hold every vector at once), :func:`count_embeddings`, :func:`embedding_ids`,
:func:`embeddings_metadata`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
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


def shard_paths(path: Path) -> list[Path]:
    """The Parquet files behind ``path``: itself, or a folder's shards sorted by name.

    Raises ``FileNotFoundError`` when ``path`` does not exist or a folder holds no shard.
    """
    path = Path(path)
    if path.is_dir():
        shards = sorted(
            p
            for p in path.iterdir()
            if p.suffix == ".parquet" and p.is_file() and not p.name.startswith((".", "_"))
        )
        if not shards:
            raise FileNotFoundError(f"{path}: a folder without embedding shards (*.parquet)")
        return shards
    if not path.exists():
        raise FileNotFoundError(f"no embeddings at {path}")
    return [path]


def _read_one(path: Path) -> tuple[np.ndarray, np.ndarray]:
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


def iter_shards(path: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, emb)`` of each shard of ``path`` in order (a single file is one shard).

    Raises ``ValueError`` when the shards disagree on the dimension.
    """
    dim: int | None = None
    for shard in shard_paths(path):
        ids, emb = _read_one(shard)
        if dim is not None and emb.shape[1] != dim:
            raise ValueError(f"{shard}: dimension {emb.shape[1]}, earlier shards have {dim}")
        dim = emb.shape[1]
        yield ids, emb


def load_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a :func:`save_embeddings` file or folder of shards -> ``(ids (N,) object str, emb
    (N, D) float32)``. Raises ``ValueError`` when shards disagree or repeat an image id."""
    shards = shard_paths(path)
    if len(shards) == 1:
        return _read_one(shards[0])
    parts = list(iter_shards(path))
    ids = np.concatenate([p[0] for p in parts])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: an image id appears in more than one shard")
    return ids, np.concatenate([p[1] for p in parts])


def count_embeddings(path: Path) -> tuple[int, int]:
    """``(rows, dim)`` of a file or folder of shards, from the Parquet footers (no vectors read)."""
    rows, dim = 0, 0
    for shard in shard_paths(path):
        meta = pq.read_metadata(shard)
        rows += meta.num_rows
        dim = int(pq.read_schema(shard).field(EMBEDDING_COLUMN).type.list_size)
    return rows, dim


def embedding_ids(path: Path) -> np.ndarray:
    """The ``image_id`` column alone of a file or folder of shards, in order."""
    return np.asarray(
        [
            i
            for s in shard_paths(path)
            for i in pq.read_table(s, columns=[schema.IMAGE_ID])[0].to_pylist()
        ],
        dtype=object,
    )


def embeddings_metadata(path: Path) -> dict[str, str]:
    """The ``imgsearch.*`` schema metadata of an embeddings file (of the first shard of a folder)."""
    meta = pq.read_schema(shard_paths(path)[0]).metadata or {}
    prefix = b"imgsearch."
    return {k[len(prefix) :].decode(): v.decode() for k, v in meta.items() if k.startswith(prefix)}
