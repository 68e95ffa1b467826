"""Deterministic image preprocessing, and a content-addressed cache of its output.

:class:`PreprocessConfig` is the preprocessing an extractor carries (input size, resize policy,
mean/std): :func:`to_uint8` turns a decoded RGB image into a ``(size, size, 3)`` uint8 array and
:func:`to_tensor` turns such arrays into a normalised float tensor. The split between the two is on
purpose: the uint8 array is what the cache stores (4x smaller than float32, independent of the
dtype a model runs in), normalisation is cheap and done at batch time.

:func:`preprocess` runs :func:`to_uint8` over a manifest and caches each result under
``cache_dir/<cfg_key>/<sha[:2]>/<sha>.npy`` (``sha`` = the image's sha256, ``cfg_key`` =
:meth:`PreprocessConfig.cache_key`, a short hash of the fields that shape the uint8 array and of this
module's algorithm version), so a re-run, or an extractor with the same geometry, skips decoding.
A file that fails becomes a quarantine row; the batch goes on.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageEnhance
from torchvision.transforms.v2 import functional as F
from tqdm.auto import tqdm

from imgsearch import schema
from imgsearch.config import from_dict as _config_from_dict
from imgsearch.data import imageio
from imgsearch.errors import ConfigError, ImageRejected
from imgsearch.paths import atomic_writer

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

RESIZE_POLICIES = ("resize_center_crop", "letterbox", "squash")
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

#: Fields that do not change what :func:`to_uint8` produces (only :func:`to_tensor` uses them).
UINT8_INDEPENDENT_FIELDS = ("mean", "std")

#: Bump when :func:`to_uint8` changes what it produces for the same config: it is part of the
#: cache key, so old cache entries are never served for new code.
ALGORITHM_VERSION = 1


@dataclass
class PreprocessConfig:
    """How an image becomes model input.

    ``resize``: ``resize_center_crop`` scales the shorter side to ``size`` and crops the centre;
    ``letterbox`` scales the longer side to ``size`` and pads to a square with
    :data:`imgsearch.data.imageio.BACKGROUND`, the colour transparency is composited on, so padding
    looks like "nothing there"; ``squash`` resizes to ``size x size`` ignoring the aspect ratio.
    ``brightness``/``contrast`` are :mod:`PIL.ImageEnhance` factors (1.0 = unchanged).
    """

    size: int = 224
    resize: str = "resize_center_crop"
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    brightness: float = 1.0
    contrast: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # YAML and JSON give lists; tuples keep the config hashable and its round-trip exact.
        self.mean = _triple(self.mean, "mean")
        self.std = _triple(self.std, "std")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"PreprocessConfig.size must be a positive int, got {self.size!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(
                f"PreprocessConfig.resize must be one of {RESIZE_POLICIES}, got {self.resize!r}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"PreprocessConfig.interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"PreprocessConfig.std must be > 0, got {self.std}")
        for name in ("brightness", "contrast"):
            value = float(getattr(self, name))
            if not value >= 0:  # also refuses NaN
                raise ConfigError(f"PreprocessConfig.{name} must be >= 0, got {value}")
            setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; :meth:`from_dict` rebuilds an equal config."""
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return _config_from_dict(cls, data)

    def cache_key(self) -> str:
        """Short hash of the canonical JSON of the fields :func:`to_uint8` depends on (plus
        :data:`ALGORITHM_VERSION`). ``mean``/``std`` are left out on purpose: they act in
        :func:`to_tensor`, at batch time, so extractors that differ only there share cached arrays."""
        payload = {"algorithm_version": ALGORITHM_VERSION, **self.to_dict()}
        for name in UINT8_INDEPENDENT_FIELDS:
            del payload[name]
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"PreprocessConfig.{name} must be 3 numbers, got {value!r}") from exc
    if len(items) != 3:
        raise ConfigError(f"PreprocessConfig.{name} must be 3 numbers, got {value!r}")
    return (items[0], items[1], items[2])


# --- single image -------------------------------------------------------------------------------


def to_uint8(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Resize (and adjust) an RGB image into a ``(cfg.size, cfg.size, 3)`` uint8 array.

    Pillow's resampling filters antialias when downscaling and are deterministic: the same image
    and config give the same bytes. Raises ``ValueError`` when ``img`` is not RGB (decode with
    :func:`imgsearch.data.imageio.open_rgb`, which composites alpha and converts modes).
    """
    if img.mode != "RGB":
        raise ValueError(f"to_uint8 expects an RGB image, got mode {img.mode!r}")
    width, height = img.size
    if width < 1 or height < 1:
        raise ValueError(f"empty image: {width}x{height}")
    size, resample = cfg.size, INTERPOLATIONS[cfg.interpolation]

    if cfg.resize == "squash":
        out = img.resize((size, size), resample)
    elif cfg.resize == "resize_center_crop":
        # One resample from the central square of the source: the same as resizing the shorter
        # side to `size` and cropping the centre, without rounding in an intermediate image.
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        out = img.resize((size, size), resample, box=(left, top, left + side, top + side))
    else:  # letterbox
        scale = size / max(width, height)
        new_w = min(size, max(1, round(width * scale)))
        new_h = min(size, max(1, round(height * scale)))
        out = Image.new("RGB", (size, size), imageio.BACKGROUND)
        out.paste(img.resize((new_w, new_h), resample), ((size - new_w) // 2, (size - new_h) // 2))

    if cfg.brightness != 1.0:
        out = ImageEnhance.Brightness(out).enhance(cfg.brightness)
    if cfg.contrast != 1.0:
        out = ImageEnhance.Contrast(out).enhance(cfg.contrast)
    return np.asarray(out, dtype=np.uint8)


def to_tensor(arr: np.ndarray | torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` or ``(N, H, W, 3)`` -> float32 ``(3, H, W)`` / ``(N, 3, H, W)``, ``(x/255 - mean) / std``."""
    if isinstance(arr, np.ndarray):
        # torch refuses to share read-only memory (np.load/mmap arrays): copy those only.
        arr = np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()
        tensor = torch.from_numpy(arr)
    else:
        tensor = arr
    if tensor.dtype != torch.uint8:
        raise ValueError(f"to_tensor expects uint8 input, got {tensor.dtype}")
    if tensor.ndim not in (3, 4) or tensor.shape[-1] != 3:
        raise ValueError(f"to_tensor expects (H, W, 3) or (N, H, W, 3), got {tuple(tensor.shape)}")
    chw = tensor.movedim(-1, -3).contiguous()
    scaled = F.to_dtype(chw, torch.float32, scale=True)
    return F.normalize(scaled, mean=list(cfg.mean), std=list(cfg.std))


def load_uint8(path: str | Path) -> np.ndarray:
    """Read one cached array (``pre_path``) without ever unpickling."""
    return np.load(path, allow_pickle=False)


# --- cache --------------------------------------------------------------------------------------


def cache_path(cache_dir: Path, cfg: PreprocessConfig, sha256: str) -> Path:
    """Where the preprocessed array of the image with ``sha256`` lives."""
    return _entry(Path(cache_dir) / cfg.cache_key(), sha256)


def _entry(root: Path, sha256: str) -> Path:
    return root / sha256[:2] / f"{sha256}.npy"


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    with atomic_writer(path, durable=False) as fh:  # a rebuildable cache: no fsync per file
        np.save(fh, arr, allow_pickle=False)


def _write_cache_description(root: Path, cfg: PreprocessConfig) -> None:
    """``<cfg_key>/config.json`` says which config made a cache folder (for people, not for lookup)."""
    target = root / "config.json"
    if target.exists():
        return
    text = json.dumps(
        {"algorithm_version": ALGORITHM_VERSION, **cfg.to_dict()}, indent=2, sort_keys=True
    )
    with atomic_writer(target, durable=False) as fh:
        fh.write(text.encode())


# --- a manifest ---------------------------------------------------------------------------------


@dataclass
class PreprocessResult:
    manifest: pd.DataFrame  # the rows that succeeded, with `pre_path`
    quarantine: pd.DataFrame  # one row per failure, stage="preprocess"
    metrics: dict[str, float]


@dataclass
class _Outcome:
    pre_path: str | None = None
    hit: bool = False
    reason: str = ""
    detail: str = ""
    detected_format: str | None = None


def _sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _one(path: str | None, sha: str | None, cfg: PreprocessConfig, root: Path) -> _Outcome:
    """Preprocess one file into the cache folder ``root`` of ``cfg``; never raises (a failure is
    an outcome with a reason)."""
    if path is None:
        return _Outcome(reason="missing_file", detail="no path in the manifest")
    try:
        source: str | bytes = path
        if not sha:
            source = imageio.read_bytes(path)  # read once: hashed here, decoded below
            sha = _sha256_of(source)
        target = _entry(root, sha)
        if target.exists():
            return _Outcome(pre_path=str(target), hit=True)
        arr = to_uint8(imageio.open_rgb(source), cfg)
        _atomic_save(target, arr)
        return _Outcome(pre_path=str(target))
    except ImageRejected as exc:
        return _Outcome(reason=exc.reason, detail=exc.detail, detected_format=exc.detected_format)
    except FileNotFoundError as exc:
        return _Outcome(reason="missing_file", detail=str(exc))
    except OSError as exc:
        return _Outcome(reason="unreadable", detail=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - any decoder error is a quarantine record (RELIABILITY 4)
        return _Outcome(reason="preprocess_failed", detail=f"{type(exc).__name__}: {exc}")


def _run_all(
    jobs: list[tuple[str | None, str | None]], cfg: PreprocessConfig, root: Path, workers: int
) -> Iterator[_Outcome]:
    """Outcomes of ``jobs`` (path, sha) in order: in this process, or in ``workers`` processes.

    Processes, not threads: decoding and resizing are CPU-bound Python + C per image, and
    :func:`imgsearch.data.imageio.open_rgb` uses ``warnings.catch_warnings`` (to escalate
    ``DecompressionBombWarning``), which is not thread-safe. "fork" where it exists: "spawn" would
    re-import the caller's ``__main__``.
    """
    if workers <= 1 or len(jobs) < 4 * workers:
        for path, sha in jobs:
            yield _one(path, sha, cfg, root)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=gc.freeze) as pool:
        yield from pool.map(
            _one,
            [p for p, _ in jobs],
            [s for _, s in jobs],
            [cfg] * len(jobs),
            [root] * len(jobs),
            chunksize=chunk,
        )


def preprocess(
    manifest: pd.DataFrame,
    cfg: PreprocessConfig,
    cache_dir: Path,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> PreprocessResult:
    """Preprocess every image of ``manifest`` into the cache and add ``pre_path``.

    Images are keyed by the manifest's ``sha256`` (computed from the file when absent), so the
    same content is decoded once, and a cached entry is never decoded again. Decoding and
    resizing run in ``workers`` processes (default: one per core; 1 = in this process). Rows that
    fail leave the manifest and become quarantine rows with ``stage="preprocess"``.
    """
    for column in (schema.IMAGE_ID, schema.PATH):
        if column not in manifest.columns:
            raise ValueError(f"manifest has no {column!r} column")
    root = Path(cache_dir) / cfg.cache_key()
    _write_cache_description(root, cfg)
    workers = workers or os.cpu_count() or 1

    tasks, row_task = _tasks(manifest)
    start = time.perf_counter()
    outcomes = _run_tasks(tasks, cfg, root, workers, progress=progress)
    seconds = time.perf_counter() - start
    pre_paths, failures = _row_outcomes(manifest, row_task, outcomes)

    out = manifest.copy()
    out[schema.PRE_PATH] = pre_paths
    ok = out[schema.PRE_PATH].notna()
    out = out[ok].reset_index(drop=True)

    hits = sum(o.hit for o in outcomes.values())
    metrics: dict[str, float] = {
        "n": float(len(manifest)),
        "n_ok": float(len(out)),
        "n_failed": float(len(failures)),
        "n_unique": float(len(tasks)),
        "cache_hits": float(hits),
        "cache_misses": float(len(tasks) - hits),
        "seconds": seconds,
        "images_per_s": len(tasks) / seconds if seconds > 0 else 0.0,
    }
    log.info(
        "preprocess: %d images (%d unique), %d cached, %d failed, %.0f images/s",
        len(manifest),
        len(tasks),
        hits,
        len(failures),
        metrics["images_per_s"],
    )
    return PreprocessResult(
        manifest=out, quarantine=schema.quarantine_rows(failures), metrics=metrics
    )


def _tasks(
    manifest: pd.DataFrame,
) -> tuple[dict[str, tuple[str | None, str | None]], list[str]]:
    """One task per distinct content (or per path when the sha is unknown), and each row's task."""
    paths = [None if pd.isna(p) else str(p) for p in manifest[schema.PATH]]
    shas = (
        [s if isinstance(s, str) and s else None for s in manifest[schema.SHA256]]
        if schema.SHA256 in manifest.columns
        else [None] * len(manifest)
    )
    tasks: dict[str, tuple[str | None, str | None]] = {}
    row_task = []
    for path, sha in zip(paths, shas, strict=True):
        key = f"sha:{sha}" if sha else f"path:{path}"
        tasks.setdefault(key, (path, sha))
        row_task.append(key)
    return tasks, row_task


def _run_tasks(
    tasks: dict[str, tuple[str | None, str | None]],
    cfg: PreprocessConfig,
    root: Path,
    workers: int,
    *,
    progress: bool,
) -> dict[str, _Outcome]:
    keys = list(tasks)
    outcomes: dict[str, _Outcome] = {}
    with tqdm(
        total=len(keys), desc="preprocess", unit="img", disable=not progress, mininterval=1.0
    ) as bar:
        for key, outcome in zip(
            keys, _run_all([tasks[k] for k in keys], cfg, root, workers), strict=True
        ):
            outcomes[key] = outcome
            bar.update()
    return outcomes


def _row_outcomes(
    manifest: pd.DataFrame, row_task: list[str], outcomes: dict[str, _Outcome]
) -> tuple[list[str | None], list[dict[str, object]]]:
    """Each row's ``pre_path`` (None when it failed) and one quarantine row per failed row."""
    pre_paths: list[str | None] = []
    failures: list[dict[str, object]] = []
    for i, key in enumerate(row_task):
        outcome = outcomes[key]
        pre_paths.append(outcome.pre_path)
        if outcome.pre_path is None:
            row = manifest.iloc[i]
            fmt = row.get(schema.FORMAT) if schema.FORMAT in manifest.columns else None
            failures.append(
                {
                    schema.IMAGE_ID: row[schema.IMAGE_ID],
                    schema.ITEM_ID: row.get(schema.ITEM_ID),
                    schema.URI: row.get(schema.URI),
                    schema.STAGE: "preprocess",
                    schema.REASON: outcome.reason,
                    schema.DETAIL: outcome.detail,
                    schema.DETECTED_FORMAT: outcome.detected_format
                    or (fmt if isinstance(fmt, str) else None),
                }
            )
            log.warning(
                "preprocess: %s quarantined (%s: %s)",
                row[schema.IMAGE_ID],
                outcome.reason,
                outcome.detail,
            )
    return pre_paths, failures
