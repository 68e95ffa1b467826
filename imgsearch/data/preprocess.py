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

import gc
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from imgsearch import schema
from imgsearch.data import imageio
from imgsearch.data.preprocess_image import (
    ALGORITHM_VERSION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    RESIZE_POLICIES,
    UINT8_INDEPENDENT_FIELDS,
    PreprocessConfig,
    images_to_tensor,
    load_uint8,
    to_tensor,
    to_uint8,
)
from imgsearch.errors import ImageRejected
from imgsearch.paths import atomic_writer

# PreprocessConfig and the single-image functions live in preprocess_image; re-exported here.
__all__ = [
    "ALGORITHM_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "RESIZE_POLICIES",
    "UINT8_INDEPENDENT_FIELDS",
    "PreprocessConfig",
    "PreprocessResult",
    "cache_path",
    "images_to_tensor",
    "load_uint8",
    "preprocess",
    "to_tensor",
    "to_uint8",
]

log = logging.getLogger(__name__)

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
