"""FAISS index over L2-normalised image embeddings, with its metadata and checksums.

An :class:`ImageIndex` pairs a FAISS index with a metadata table: row ``i`` of ``meta`` is FAISS
id ``i`` (ids are positional; :meth:`ImageIndex.add` appends). Vectors are L2-normalised float32,
so with ``metric="ip"`` a score is the cosine similarity. Scores returned by :meth:`ImageIndex.search`
are always "higher is better": with ``metric="l2"`` the squared distance ``d`` is turned into the
cosine ``1 - d / 2`` (exact for unit vectors).

On disk an index is a directory::

    index.faiss    faiss.write_index output
    meta.parquet   the metadata table
    index.json     sha256 of both files, extractor fingerprint, factory, dim, count, metric, search params

:meth:`ImageIndex.load` reads the bytes, checks their sha256 against ``index.json`` and only then
hands them to FAISS (``faiss.deserialize_index``) and pandas, so a tampered file is refused before a
parser sees it (RELIABILITY 8).

Elsewhere in :mod:`imgsearch.search`: the factory choice (:mod:`~imgsearch.search.factory`),
building with tuned search parameters and measured recall (:mod:`~imgsearch.search.measure`),
versioned atomic publishing behind a ``CURRENT`` pointer (:mod:`~imgsearch.search.publish`) and
ranking (:mod:`~imgsearch.search.ranking`).

"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from imgsearch import schema
from imgsearch.errors import ConfigError, ExtractorMismatchError, IndexIntegrityError
from imgsearch.paths import sha256_file
from imgsearch.search.factory import METRICS, IndexConfig, choose_factory

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "meta.parquet"
INFO_FILE = "index.json"
FORMAT_VERSION = 1

_ADD_CHUNK = 100_000
_NORM_TOLERANCE = 1e-2


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_embeddings(emb: np.ndarray, dim: int | None = None) -> np.ndarray:
    arr = np.ascontiguousarray(emb, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"embeddings have dimension {arr.shape[1]}, the index has {dim}")
    if not np.isfinite(arr).all():
        raise ValueError("embeddings contain NaN or inf")
    if len(arr):
        norms = np.linalg.norm(arr, axis=1)
        bad = np.abs(norms - 1.0) > _NORM_TOLERANCE
        if bad.any():
            raise ValueError(
                f"embeddings must be L2-normalised: {int(bad.sum())} rows have norms off 1 "
                f"(e.g. {float(norms[bad][0]):.4f})"
            )
    return arr


def _check_meta(meta: pd.DataFrame, n: int) -> pd.DataFrame:
    missing = [c for c in (schema.IMAGE_ID, schema.ITEM_ID) if c not in meta.columns]
    if missing:
        raise ValueError(f"index metadata lacks columns {missing}")
    if len(meta) != n:
        raise ValueError(f"metadata has {len(meta)} rows for {n} embeddings")
    if meta[schema.IMAGE_ID].duplicated().any():
        dup = meta.loc[meta[schema.IMAGE_ID].duplicated(), schema.IMAGE_ID].iloc[0]
        raise ValueError(f"duplicate image_id in index metadata: {dup!r}")
    return meta.reset_index(drop=True)


def new_faiss_index(n: int, d: int, cfg: IndexConfig) -> tuple[faiss.Index, str]:
    """An empty FAISS index for ``n`` vectors of dimension ``d`` and its factory string."""
    factory = (
        choose_factory(n, d, cfg.memory_budget_mb, cfg.flat_max)
        if cfg.factory == "auto"
        else cfg.factory
    )
    if "IDMap" in factory:
        raise ConfigError(f"factory {factory!r}: ids are positional, IDMap is not supported")
    try:
        return faiss.index_factory(d, factory, METRICS[cfg.metric]), factory
    except RuntimeError as exc:
        raise ConfigError(f"bad FAISS factory string {factory!r}: {exc}") from exc


def train_positions(n: int, cfg: IndexConfig) -> np.ndarray | None:
    """Sorted positions of the (seeded) training sample, or None when all ``n`` vectors train."""
    if n <= cfg.train_sample:
        return None
    return np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.train_sample, replace=False))


class ImageIndex:
    """A FAISS index plus its metadata (row ``i`` = FAISS id ``i``).

    Build with :meth:`build` (or :func:`build_index` for metrics), query with :meth:`search`,
    append with :meth:`add`, persist with :meth:`save` / :meth:`load`.
    """

    def __init__(
        self,
        index: faiss.Index,
        meta: pd.DataFrame,
        *,
        factory: str,
        metric: str = "ip",
        extractor_fingerprint: str | None = None,
        search_params: dict[str, int] | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        if index.metric_type != METRICS[metric]:
            raise ValueError(f"FAISS index metric {index.metric_type} does not match {metric!r}")
        self.index = index
        self.meta = _check_meta(meta, int(index.ntotal))
        self.factory = factory
        self.metric = metric
        self.extractor_fingerprint = extractor_fingerprint
        self.search_params: dict[str, int] = {}
        self._direct_map = False  # IVF: reconstruct() needs FAISS's id -> list map, made once
        self.set_search_params(**(search_params or {}))

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        emb: np.ndarray,
        meta: pd.DataFrame,
        cfg: IndexConfig | None = None,
        extractor_fingerprint: str | None = None,
    ) -> ImageIndex:
        """Train (when the factory needs it) and fill an index with ``emb`` (N, D) and ``meta`` (N rows).

        Search parameters are set from ``cfg`` when given (tuning is :func:`build_index`'s job).
        Raises ValueError on bad shapes, non-normalised vectors or duplicate image ids.
        """
        cfg = cfg or IndexConfig()
        arr = check_embeddings(emb)
        meta = _check_meta(meta, len(arr))
        n, d = arr.shape
        index, factory = new_faiss_index(n, d, cfg)
        if not index.is_trained:
            if n == 0:
                raise ValueError(f"factory {factory!r} needs training vectors; got none")
            pick = train_positions(n, cfg)
            sample = arr if pick is None else arr[pick]
            log.info("training %s on %d vectors", factory, len(sample))
            index.train(sample)
        out = cls(
            index,
            meta.iloc[:0],
            factory=factory,
            metric=cfg.metric,
            extractor_fingerprint=extractor_fingerprint,
        )
        out._add_vectors(arr)
        out.meta = meta
        params = {"nprobe": cfg.nprobe, "ef_search": cfg.ef_search}
        out.set_search_params(**{k: int(v) for k, v in params.items() if v is not None})
        return out

    def _add_vectors(self, arr: np.ndarray) -> None:
        chunks = range(0, len(arr), _ADD_CHUNK)
        for start in tqdm(chunks, desc="index add", unit="chunk", disable=len(chunks) < 3):
            self.index.add(arr[start : start + _ADD_CHUNK])

    def add(self, emb: np.ndarray, meta: pd.DataFrame) -> None:
        """Append vectors (new FAISS ids ``count .. count+len-1``) and their metadata rows.

        Image ids must stay unique across the whole index. An IVF index keeps its trained
        centroids (retrain by rebuilding when the data moved far).
        """
        arr = check_embeddings(emb, self.dim)
        meta = _check_meta(meta, len(arr))
        clash = set(meta[schema.IMAGE_ID]) & set(self.meta[schema.IMAGE_ID])
        if clash:
            raise ValueError(f"image ids already in the index: {sorted(clash)[:5]}")
        if not len(arr):
            return
        combined = pd.concat([self.meta, meta], ignore_index=True)
        self._add_vectors(arr)
        self.meta = combined
        self._direct_map = False

    # --- properties and parameters -----------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def __len__(self) -> int:
        return self.count

    def ivf(self) -> Any | None:
        try:
            return faiss.extract_index_ivf(self.index)
        except RuntimeError:
            return None

    def hnsw(self) -> Any | None:
        return self.index if hasattr(self.index, "hnsw") else None

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set ``nprobe`` (IVF) / ``ef_search`` (HNSW); a parameter the index has not is ignored."""
        space = faiss.ParameterSpace()
        if nprobe is not None and self.ivf() is not None:
            space.set_index_parameter(self.index, "nprobe", int(nprobe))
            self.search_params["nprobe"] = int(nprobe)
        if ef_search is not None and self.hnsw() is not None:
            space.set_index_parameter(self.index, "efSearch", int(ef_search))
            self.search_params["ef_search"] = int(ef_search)

    # --- queries -----------------------------------------------------------------------------
    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of each query: ``(scores (M, k) float32, positions (M, k) int64)``.

        ``q`` is (M, D) or (D,) float32, L2-normalised like the index. Scores are higher-is-better
        (cosine); missing results (fewer than ``k`` reachable vectors) have position -1 and
        score -inf.
        """
        arr = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"queries must be (M, {self.dim}), got shape {np.shape(q)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.count == 0 or len(arr) == 0:
            return (
                np.full((len(arr), k), -np.inf, dtype=np.float32),
                np.full((len(arr), k), -1, dtype=np.int64),
            )
        scores, positions = self.index.search(arr, k)
        scores = scores.astype(np.float32, copy=False)
        if self.metric == "l2":
            scores = 1.0 - scores / 2.0
        scores[positions < 0] = -np.inf
        return scores, positions.astype(np.int64, copy=False)

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """The stored vectors at ``positions`` (approximate for SQ/PQ storage), shape (len, D)."""
        pos = np.asarray(positions, dtype=np.int64).ravel()
        if len(pos) and (pos.min() < 0 or pos.max() >= self.count):
            raise IndexError(f"positions out of range [0, {self.count})")
        ivf = self.ivf()
        if ivf is not None and not self._direct_map:
            ivf.make_direct_map()
            self._direct_map = True
        if not len(pos):
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.index.reconstruct_batch(pos), dtype=np.float32)

    # --- persistence -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "factory": self.factory,
            "metric": self.metric,
            "dim": self.dim,
            "count": self.count,
            "extractor_fingerprint": self.extractor_fingerprint,
            "search_params": dict(self.search_params),
        }

    def save(self, directory: Path | str) -> Path:
        """Write ``index.faiss``, ``meta.parquet`` and ``index.json`` (with their sha256) into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(out / INDEX_FILE))
        self.meta.to_parquet(out / META_FILE, index=False)
        info = self.info()
        info["sha256"] = {
            INDEX_FILE: sha256_file(out / INDEX_FILE),
            META_FILE: sha256_file(out / META_FILE),
        }
        (out / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        return out

    @classmethod
    def load(
        cls, directory: Path | str, expected_extractor_fingerprint: str | None = None
    ) -> ImageIndex:
        """Load a saved index, verifying checksums before any parser reads the files.

        Raises IndexIntegrityError (missing file, bad index.json, sha256 mismatch, inconsistent
        counts) and ExtractorMismatchError (``expected_extractor_fingerprint`` given and different).
        """
        src = Path(directory)
        info = read_info(src)
        if (
            expected_extractor_fingerprint is not None
            and info.get("extractor_fingerprint") != expected_extractor_fingerprint
        ):
            raise ExtractorMismatchError(
                f"index at {src} was built with extractor {info.get('extractor_fingerprint')!r}, "
                f"not {expected_extractor_fingerprint!r}"
            )
        # read once, hash the bytes in memory, and parse those same bytes: no window between
        # the check and the read in which the file could change
        blobs = {}
        for name in (INDEX_FILE, META_FILE):
            try:
                data = (src / name).read_bytes()
            except OSError as exc:
                raise IndexIntegrityError(f"cannot read {src / name}: {exc}") from exc
            if _sha256_bytes(data) != info["sha256"].get(name):
                raise IndexIntegrityError(f"{src / name}: sha256 does not match index.json")
            blobs[name] = data
        index = faiss.deserialize_index(np.frombuffer(blobs[INDEX_FILE], dtype=np.uint8))
        meta = pd.read_parquet(io.BytesIO(blobs[META_FILE]))
        if (
            int(index.ntotal) != info["count"]
            or len(meta) != info["count"]
            or index.d != info["dim"]
        ):
            raise IndexIntegrityError(f"{src}: count/dim of the files disagree with index.json")
        return cls(
            index,
            meta,
            factory=str(info["factory"]),
            metric=str(info["metric"]),
            extractor_fingerprint=info.get("extractor_fingerprint"),
            search_params=dict(info.get("search_params") or {}),
        )


def read_info(directory: Path | str) -> dict[str, Any]:
    """``index.json`` of a saved index, checked for the keys :meth:`ImageIndex.load` relies on."""
    path = Path(directory) / INFO_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexIntegrityError(f"cannot read {path}: {exc}") from exc
    required = ("sha256", "factory", "metric", "dim", "count")
    if not isinstance(info, dict) or any(k not in info for k in required):
        raise IndexIntegrityError(f"{path} lacks one of {required}")
    if not isinstance(info["sha256"], dict):
        raise IndexIntegrityError(f"{path}: sha256 must be a mapping")
    return info


def verify_dir(directory: Path | str) -> dict[str, Any]:
    """Check the sha256 of a saved index's files against its ``index.json``; returns the info."""
    src = Path(directory)
    info = read_info(src)
    for name in (INDEX_FILE, META_FILE):
        try:
            digest = sha256_file(src / name)
        except OSError as exc:
            raise IndexIntegrityError(f"cannot read {src / name}: {exc}") from exc
        if digest != info["sha256"].get(name):
            raise IndexIntegrityError(f"{src / name}: sha256 does not match index.json")
    return info


#: Manifest columns not carried into an index's metadata (local cache paths).
NON_META_COLUMNS = (schema.PRE_PATH,)


def gallery_meta(ids: np.ndarray, manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows of the embedded images ``ids``, in embedding order (index metadata).

    Raises ``ValueError`` when an embedded image is not in the manifest.
    """
    table = manifest.drop(columns=[c for c in NON_META_COLUMNS if c in manifest.columns])
    table = table.assign(**{schema.IMAGE_ID: table[schema.IMAGE_ID].astype(str)})
    table = table.drop_duplicates(schema.IMAGE_ID).set_index(schema.IMAGE_ID)
    missing = [i for i in ids if i not in table.index]
    if missing:
        raise ValueError(
            f"{len(missing)} embedded images are not in the manifest, e.g. {missing[:3]}"
        )
    return table.loc[[str(i) for i in ids]].reset_index()
