"""Batch feature extraction: reader -> mapper -> writer, streaming, one row per image or failure.

- **reader**: a ``torch.utils.data.Dataset`` over the manifest. A row whose ``pre_path`` was made
  with exactly this extractor's :class:`~imgsearch.data.preprocess.PreprocessConfig` (the cache folder is
  named by ``PreprocessConfig.cache_key()``) is read from that ``.npy``; any other row is decoded
  from ``path`` with :func:`imgsearch.data.imageio.open_rgb` + :func:`imgsearch.data.preprocess.to_uint8`, the
  same two calls that made the cache. A file that cannot be read becomes a failure (quarantine
  schema, ``stage="extract"``), never a silent drop. A ``DataLoader`` runs it in worker processes.
- **mapper**: :func:`imgsearch.data.preprocess.to_tensor` then the extractor, under
  ``torch.inference_mode``, channels-last, optionally bf16 autocast and ``torch.compile``. Both
  are checked on the first batch against plain fp32 (cosine >= :data:`BF16_MIN_COSINE` /
  :data:`COMPILE_MIN_COSINE`; bf16 must also be faster) and dropped, with a metric saying so,
  when they do not hold.
- **writer**: rows go, in manifest order, into an array of ``N`` rows allocated up front, or into
  an ``.npy`` memmap (``out=``), so memory does not grow while the pass runs.

:func:`embed_images` is the query path: the same ``to_uint8`` -> ``to_tensor`` -> extractor.

Embedding files (:func:`save_embeddings` / :func:`load_embeddings`) are Parquet: a string column
``image_id`` and a ``fixed_size_list<float32>[D]`` column ``embedding``, written in row groups;
the schema metadata records ``imgsearch.embedding_dim`` (and optional keys such as the extractor
fingerprint, see :func:`embeddings_metadata`). One self-describing file per run, readable by pandas,
DuckDB or Spark as well as by :func:`load_embeddings`.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from imgsearch import schema
from imgsearch.data import imageio
from imgsearch.data.preprocess import PreprocessConfig, load_uint8, to_tensor, to_uint8
from imgsearch.errors import ConfigError, ImageRejected
from imgsearch.models.backbones import Extractor

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
#: bf16 is kept only when every first-batch embedding stays this close to fp32's.
BF16_MIN_COSINE = 0.999
#: How many images of the first batch the bf16 trial runs on (emulated bf16 can be very slow).
BF16_PROBE_IMAGES = 4
#: torch.compile is kept only when it reproduces eager fp32 this closely on the first batch.
COMPILE_MIN_COSINE = 0.9999
EMBEDDING_COLUMN = "embedding"
_PARQUET_ROWS_PER_GROUP = 16_384


@dataclass
class ExtractConfig:
    """How the extract stage runs.

    ``backbone``/``weights`` say which extractor the extract *step* creates
    (:func:`imgsearch.models.backbones.create_extractor`); :func:`extract` itself takes a built one.
    ``num_workers``/``threads``: ``"auto"`` or an int; see :func:`resolve_parallelism`.
    ``device``: ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda[:i]"``.
    """

    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    batch_size: int = 64
    num_workers: int | str = "auto"
    threads: int | str = "auto"
    channels_last: bool = True
    precision: str = "fp32"
    compile: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ConfigError(
                f"ExtractConfig.batch_size must be a positive int, got {self.batch_size!r}"
            )
        for name, low in (("num_workers", 0), ("threads", 1)):
            value = getattr(self, name)
            if value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(
                    f"ExtractConfig.{name} must be 'auto' or an int >= {low}, got {value!r}"
                )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"ExtractConfig.precision must be one of {PRECISIONS}, got {self.precision!r}"
            )
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ConfigError(f"ExtractConfig.device {self.device!r}: {exc}") from exc


@dataclass
class ExtractResult:
    ids: np.ndarray  # (N_ok,) object array of image_id str, in manifest order
    embeddings: np.ndarray  # (N_ok, D) float32, unit L2 norm
    failures: pd.DataFrame  # quarantine schema, stage="extract"
    metrics: dict[str, Any] = field(default_factory=dict)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_parallelism(cfg: ExtractConfig, cores: int | None = None) -> tuple[int, int]:
    """``(num_workers, torch threads)`` for ``cfg``; ``auto`` keeps ``workers + threads = cores``.

    ``auto`` workers: none up to 4 cores, then one per 8 cores. Reading is cheap next to the
    forward pass (measured: 1.4 ms of CPU per image to decode + resize a 320x240 JPEG, less from
    the ``pre_path`` cache, vs 34 ms for MobileNetV2 and 141 ms for ResNet-50 per image on one
    thread), so on a small machine a dedicated reader process would idle on a core the forward
    pass needs, and a reader beside a full thread pool oversubscribes the cores. Set
    ``num_workers`` by hand when decoding large originals (no usable ``pre_path``).
    """
    cores = cores or available_cores()
    workers = (
        cfg.num_workers
        if isinstance(cfg.num_workers, int)
        else (0 if cores <= 4 else max(1, cores // 8))
    )
    threads = cfg.threads if isinstance(cfg.threads, int) else max(1, cores - workers)
    return workers, threads


# --- reader ---------------------------------------------------------------------------------------


@dataclass
class _Item:
    index: int
    array: np.ndarray | None  # (S, S, 3) uint8
    from_cache: bool = False
    reason: str = ""
    detail: str = ""
    detected_format: str | None = None


class _ImageDataset(Dataset[_Item]):
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

    def __getitem__(self, i: int) -> _Item:
        cached = self._cached(i)
        if cached is not None:
            return _Item(i, cached, from_cache=True)
        path = self.paths[i]
        if not path:
            return _Item(i, None, reason="missing_file", detail="no path in the manifest")
        try:
            return _Item(i, to_uint8(imageio.open_rgb(path), self.cfg))
        except ImageRejected as exc:
            return _Item(
                i, None, reason=exc.reason, detail=exc.detail, detected_format=exc.detected_format
            )
        except FileNotFoundError as exc:
            return _Item(i, None, reason="missing_file", detail=str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad file is a failure row; the batch goes on
            return _Item(
                i, None, reason="extract_read_failed", detail=f"{type(exc).__name__}: {exc}"
            )


@dataclass
class _Batch:
    indices: list[int]
    pixels: torch.Tensor  # (B, S, S, 3) uint8
    n_cached: int
    failed: list[_Item]


def _collate(items: list[_Item]) -> _Batch:
    """Stack the readable items; the rest travel along as failures (never dropped)."""
    ok = [it for it in items if it.array is not None]
    failed = [it for it in items if it.array is None]
    if ok:
        pixels = torch.from_numpy(np.stack([it.array for it in ok if it.array is not None]))
    else:
        pixels = torch.empty((0, 0, 0, 3), dtype=torch.uint8)
    return _Batch([it.index for it in ok], pixels, sum(it.from_cache for it in ok), failed)


# --- mapper ---------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).min())


class _Mapper:
    """uint8 batch -> unit-norm float32 embeddings; decides bf16/compile on its first batch."""

    def __init__(self, extractor: Extractor, cfg: ExtractConfig, device: torch.device) -> None:
        self.extractor = extractor
        self.preprocess = extractor.spec.preprocess
        self.cfg = cfg
        self.device = device
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model: Any = extractor
        self.bf16 = False
        self.decided = False
        self.metrics: dict[str, Any] = {
            "bf16_used": 0.0,
            "compile_used": 0.0,
            "precision_used": "fp32",
        }

    def _input(self, pixels: torch.Tensor) -> torch.Tensor:
        x = to_tensor(pixels, self.preprocess)
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def _forward(self, model: Any, x: torch.Tensor, bf16: bool) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        return out.float()

    def _decide(self, x: torch.Tensor) -> torch.Tensor:
        """Run the first batch in fp32 eager (its result is what we keep) and try the options."""
        start = time.perf_counter()
        reference = self._forward(self.extractor, x, bf16=False)
        self.metrics["first_batch_fp32_s"] = time.perf_counter() - start
        if self.cfg.precision == "bf16":
            self.bf16 = self._try_bf16(x[:BF16_PROBE_IMAGES], reference[:BF16_PROBE_IMAGES])
        if self.cfg.compile:
            try:
                compiled = torch.compile(self.extractor)
                start = time.perf_counter()
                trial = self._forward(compiled, x, bf16=False)
                self.metrics["compile_s"] = time.perf_counter() - start
                cosine = _min_cosine(reference, trial)
            except Exception as exc:  # noqa: BLE001 - backends fail in many ways (no compiler, ...)
                log.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
                compiled, cosine = None, float("nan")
            self.metrics["compile_min_cosine"] = cosine
            if compiled is not None and cosine >= COMPILE_MIN_COSINE:
                self.model = compiled
            else:
                log.warning("torch.compile not used (min cosine %.6f)", cosine)
        self.metrics["bf16_used"] = float(self.bf16)
        self.metrics["compile_used"] = float(self.model is not self.extractor)
        self.metrics["precision_used"] = "bf16" if self.bf16 else "fp32"
        self.decided = True
        return reference

    def _try_bf16(self, probe: torch.Tensor, reference: torch.Tensor) -> bool:
        """bf16 is kept when it is as accurate (cosine) *and* faster than fp32 on a few images:
        CPUs without native bf16 emulate it, many times slower than fp32."""
        try:
            cosine = _min_cosine(reference, self._forward(self.extractor, probe, bf16=True))
        except RuntimeError as exc:  # an op without a bf16 kernel on this device
            log.warning("bf16 autocast failed (%s); using fp32", exc)
            cosine = float("nan")
        self.metrics["bf16_min_cosine"] = cosine
        if not cosine >= BF16_MIN_COSINE:
            log.warning("bf16 min cosine vs fp32 %.5f < %.3f: using fp32", cosine, BF16_MIN_COSINE)
            return False
        timings = {}
        for bf16 in (False, True):  # both warm now
            start = time.perf_counter()
            self._forward(self.extractor, probe, bf16=bf16)
            timings[bf16] = time.perf_counter() - start
        self.metrics["bf16_speedup"] = timings[False] / max(timings[True], 1e-9)
        if timings[True] >= timings[False]:
            log.warning(
                "bf16 is not faster than fp32 here (x%.2f): using fp32",
                self.metrics["bf16_speedup"],
            )
            return False
        return True

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        x = self._input(pixels)
        out = self._decide(x) if not self.decided else self._forward(self.model, x, self.bf16)
        if self.bf16:  # autocast output re-normalised in fp32
            out = torch.nn.functional.normalize(out, dim=1)
        return out.cpu().numpy()


# --- writer ---------------------------------------------------------------------------------------


class _Writer:
    """Appends rows in order into ``N`` preallocated rows (memory or an ``.npy`` memmap)."""

    def __init__(self, n: int, dim: int, out: Path | None) -> None:
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
        if isinstance(self.array, np.memmap):
            self.array.flush()
        return np.asarray(self.ids, dtype=object), self.array[: len(self.ids)]


# --- the pass -------------------------------------------------------------------------------------


def _failure_row(
    manifest: pd.DataFrame, i: int, reason: str, detail: str, fmt: str | None
) -> dict[str, object]:
    row = manifest.iloc[i]
    return {
        schema.IMAGE_ID: row[schema.IMAGE_ID],
        schema.ITEM_ID: row.get(schema.ITEM_ID),
        schema.URI: row.get(schema.URI),
        schema.STAGE: "extract",
        schema.REASON: reason,
        schema.DETAIL: detail,
        schema.DETECTED_FORMAT: fmt,
    }


def _column(manifest: pd.DataFrame, name: str) -> list[str | None]:
    if name not in manifest.columns:
        return [None] * len(manifest)
    return [v if isinstance(v, str) and v else None for v in manifest[name]]


def extract(
    extractor: Extractor,
    manifest: pd.DataFrame,
    cfg: ExtractConfig | None = None,
    *,
    out: Path | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Embed every row of ``manifest`` (needs ``image_id`` and ``path``; uses ``pre_path`` when
    it matches). ``out``: stream embeddings into this ``.npy`` memmap instead of memory (the
    result's ``embeddings`` is then a view of it; its first ``len(ids)`` rows are the valid ones).

    The extractor is restored afterwards (device, memory format, train/eval mode; torch's
    thread count too). Raises ``ValueError`` when a required column is missing.
    """
    cfg = cfg or ExtractConfig()
    for column in (schema.IMAGE_ID, schema.PATH):
        if column not in manifest.columns:
            raise ValueError(f"manifest has no {column!r} column")
    if manifest[schema.IMAGE_ID].duplicated().any():
        raise ValueError("manifest image_id values are not unique")
    manifest = manifest.reset_index(drop=True)
    n, dim = len(manifest), extractor.spec.embedding_dim
    workers, threads = resolve_parallelism(cfg)
    device = _resolve_device(cfg.device)
    image_ids = manifest[schema.IMAGE_ID].astype(str).tolist()

    dataset = _ImageDataset(
        _column(manifest, schema.PATH),
        _column(manifest, schema.PRE_PATH),
        extractor.spec.preprocess,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    writer = _Writer(n, dim, out)
    failures: list[dict[str, object]] = []
    n_cached = n_read = 0

    was_training = extractor.training
    original_device = next(extractor.parameters()).device
    original_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    mapper = _Mapper(extractor, cfg, device)
    start = time.perf_counter()
    try:
        extractor.eval().to(device).to(memory_format=mapper.memory_format)
        with (
            torch.inference_mode(),
            tqdm(total=n, desc="extract", unit="img", disable=not progress) as bar,
        ):
            for batch in loader:
                for item in batch.failed:
                    failures.append(
                        _failure_row(
                            manifest, item.index, item.reason, item.detail, item.detected_format
                        )
                    )
                    log.warning(
                        "extract: %s failed (%s: %s)",
                        image_ids[item.index],
                        item.reason,
                        item.detail,
                    )
                if batch.indices:
                    emb = mapper(batch.pixels)
                    finite = np.isfinite(emb).all(axis=1) & (np.linalg.norm(emb, axis=1) > 0.5)
                    for j in np.flatnonzero(~finite):
                        failures.append(
                            _failure_row(
                                manifest,
                                batch.indices[j],
                                "bad_embedding",
                                "non-finite or zero vector",
                                None,
                            )
                        )
                    writer.write(
                        [image_ids[i] for i, ok in zip(batch.indices, finite, strict=True) if ok],
                        emb[finite],
                    )
                    n_cached += batch.n_cached
                    n_read += len(batch.indices)
                bar.update(len(batch.indices) + len(batch.failed))
    finally:
        extractor.to(original_device).to(memory_format=torch.contiguous_format)
        extractor.train(was_training)
        torch.set_num_threads(original_threads)
    seconds = time.perf_counter() - start

    ids, embeddings = writer.finish()
    quarantine = schema.quarantine_rows(failures)
    metrics: dict[str, Any] = {
        "n": float(n),
        "n_ok": float(len(ids)),
        "n_failed": float(len(quarantine)),
        "n_from_cache": float(n_cached),
        "n_decoded": float(n_read - n_cached),
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else 0.0,
        "batch_size": float(cfg.batch_size),
        "num_workers": float(workers),
        "threads": float(threads),
        "channels_last": float(cfg.channels_last),
        **mapper.metrics,
    }
    log.info(
        "extract: %d images, %d failed, %.1f images/s (%d workers, %d threads, %s)",
        n,
        len(quarantine),
        metrics["images_per_s"],
        workers,
        threads,
        metrics["precision_used"],
    )
    return ExtractResult(ids=ids, embeddings=embeddings, failures=quarantine, metrics=metrics)


# --- the query path -------------------------------------------------------------------------------


def _as_rgb(img: Image.Image) -> Image.Image:
    """RGB as :func:`imageio.open_rgb` would make it: other modes go through a lossless re-encode
    (PNG, or TIFF for modes PNG cannot hold) and the same normalisation (alpha on the fixed
    background, 16-bit scaling, palette/CMYK conversion)."""
    if img.mode == "RGB":
        return img
    buffer = io.BytesIO()
    try:
        img.save(buffer, format="PNG")
    except (OSError, KeyError, ValueError):
        buffer = io.BytesIO()
        img.save(buffer, format="TIFF")
    return imageio.open_rgb(buffer.getvalue())


def embed_images(
    extractor: Extractor, images: Sequence[Image.Image], *, batch_size: int = 64
) -> np.ndarray:
    """Embed decoded images (``open_rgb`` output, or any PIL image) -> ``(N, D)`` float32, unit norm.

    Same preprocessing as :func:`extract` (``to_uint8`` then ``to_tensor``), fp32, eval mode.
    """
    pre = extractor.spec.preprocess
    out = np.empty((len(images), extractor.spec.embedding_dim), dtype=np.float32)
    device = next(extractor.parameters()).device
    was_training = extractor.training
    extractor.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                pixels = np.stack([to_uint8(_as_rgb(img), pre) for img in chunk])
                x = to_tensor(pixels, pre).to(device)
                out[start : start + len(chunk)] = extractor(x).float().cpu().numpy()
    finally:
        extractor.train(was_training)
    return out


# --- files ----------------------------------------------------------------------------------------


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
