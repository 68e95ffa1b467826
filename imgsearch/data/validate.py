"""Validate and clean a manifest's image files: decode safely, fix, de-duplicate, cap per item.

``validate(manifest, cfg, clean_dir)`` decodes every file with :func:`imgsearch.data.imageio.load_image`
and returns the clean manifest (plus ``sha256, format, width, height, fixes, phash``) and one
quarantine row per file it drops, with a reason. Nothing is dropped silently:
``len(clean) + len(quarantine) == len(manifest)`` always holds (checked before returning).

Quarantine reasons: the decode reasons of :func:`~imgsearch.data.imageio.load_image` (``empty_file``,
``not_an_image``, ``unsupported_format``, ``decompression_bomb``, ``too_small``, ``truncated``,
``corrupt``, ``unsupported_mode``, ``file_too_large``), ``unreadable`` (the file cannot be read),
``duplicate_exact`` (same sha256 as an earlier row; detail names the kept ``image_id``),
``duplicate_near`` (perceptual hash within ``near_duplicate_distance`` of an earlier kept row,
within the same item by default) and ``over_item_cap``. ``unexpected_error`` marks a failure
nobody foresaw; it is logged with its traceback and the batch goes on.

Rows whose normalisation changed something (``fixes`` non-empty) get a normalised PNG copy in the
content-addressed store ``clean_dir/<sha[:2]>/<sha256>.png`` (sha256 of the original bytes;
written to a temporary name, then ``os.replace``), and ``path`` points at that copy. ``width`` and
``height`` are those of the normalised image (after EXIF rotation), ``format`` the original's.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import pandas as pd
from tqdm.auto import tqdm

from imgsearch import schema
from imgsearch.data.imageio import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    load_image,
    read_bytes,
)
from imgsearch.data.near_duplicates import near_pairs
from imgsearch.data.validate_tables import (
    NEAR_DUPLICATE_COLUMNS,
    STAGE,
    clean_frame,
    pairs_frame,
    quarantine_frame,
    safe_text,
    validate_metrics,
)
from imgsearch.errors import CatalogError, ConfigError, ImageRejected
from imgsearch.paths import atomic_writer

log = logging.getLogger(__name__)

NEAR_DUPLICATE_SCOPES = ("item", "all", "none")

__all__ = [
    "NEAR_DUPLICATE_COLUMNS",
    "NEAR_DUPLICATE_SCOPES",
    "STAGE",
    "ValidateConfig",
    "ValidateResult",
    "inspect_file",
    "validate",
    "write_clean_copy",
]


@dataclass
class ValidateConfig:
    """Defaults live in configs/validate.yaml.

    ``near_duplicate_scope``: ``item`` drops near duplicates within an item only and reports
    cross-item pairs (different items may legitimately look alike: two emoji of one shape in
    different colours have the same grey-level perceptual hash); ``all`` drops them across items
    too; ``none`` drops none (pairs are still reported). ``cross_item_check_max``: above this many
    images the all-pairs report is skipped (it is quadratic) and only within-item pairs are checked.
    ``workers`` > 1 decodes in that many processes.

    ``phash_size`` 16 (a 256-bit ``imagehash.phash``) with distance 24, not the usual 64-bit hash
    with distance ~4: on the emoji demo (600 emoji x 4 vendors) the 64-bit hash put 0.17% of
    different vendors' drawings of one emoji within distance 4 (a rainbow pair at distance 0),
    while the 256-bit hash kept every such pair at >= 42 and still caught 99% of true variants
    (JPEG q70 re-encode, 64->48->64 px resize, +10% brightness).
    """

    min_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    phash_size: int = 16
    near_duplicate_distance: int = 24
    near_duplicate_scope: str = "item"
    max_images_per_item: int | None = None
    cross_item_check_max: int = 50_000
    workers: int = 1

    def __post_init__(self) -> None:
        if self.min_size < 1:
            raise ConfigError(f"validate.min_size must be >= 1, got {self.min_size}")
        if self.max_pixels < 1 or self.max_bytes < 1:
            raise ConfigError("validate.max_pixels and validate.max_bytes must be >= 1")
        if self.phash_size < 2:
            raise ConfigError(f"validate.phash_size must be >= 2, got {self.phash_size}")
        if not 0 <= self.near_duplicate_distance <= self.phash_size**2:
            raise ConfigError(
                f"validate.near_duplicate_distance must be in 0..{self.phash_size**2} "
                f"(bits of the hash), got {self.near_duplicate_distance}"
            )
        if self.near_duplicate_scope not in NEAR_DUPLICATE_SCOPES:
            raise ConfigError(
                f"validate.near_duplicate_scope must be one of {NEAR_DUPLICATE_SCOPES}, "
                f"got {self.near_duplicate_scope!r}"
            )
        if self.max_images_per_item is not None and self.max_images_per_item < 1:
            raise ConfigError("validate.max_images_per_item must be >= 1 or null")
        if self.workers < 1:
            raise ConfigError("validate.workers must be >= 1")


@dataclass
class ValidateResult:
    clean: pd.DataFrame
    quarantine: pd.DataFrame
    metrics: dict[str, float]
    #: near-duplicate pairs found (columns NEAR_DUPLICATE_COLUMNS); ``action`` is dropped|reported
    near_duplicates: pd.DataFrame = field(default_factory=lambda: pairs_frame([]))


def validate(manifest: pd.DataFrame, cfg: ValidateConfig, clean_dir: Path) -> ValidateResult:
    """Check every image of ``manifest`` (needs ``image_id, item_id, path``); see the module doc."""
    _check_manifest(manifest)
    clean_dir = Path(clean_dir).resolve()
    manifest = manifest.reset_index(drop=True)
    start = time.perf_counter()
    paths = [None if pd.isna(p) else str(p) for p in manifest[schema.PATH]]
    results = _inspect_all(paths, cfg, clean_dir)

    rejected: dict[int, _Rejection] = {
        i: (res["reason"], res["detail"], res.get("detected_format"))
        for i, res in enumerate(results)
        if "reason" in res
    }
    image_ids = manifest[schema.IMAGE_ID].astype(str).tolist()
    item_ids = manifest[schema.ITEM_ID].astype(str).tolist()
    ok = [i for i in range(len(results)) if i not in rejected]
    ok = _drop_exact_duplicates(ok, results, image_ids, rejected)
    all_pairs = len(ok) <= cfg.cross_item_check_max
    ok, pair_rows = _drop_near_duplicates(
        ok, results, image_ids, item_ids, rejected, cfg, all_pairs=all_pairs
    )
    if cfg.max_images_per_item is not None:
        ok = _cap_per_item(ok, results, item_ids, rejected, cfg.max_images_per_item)

    clean = clean_frame(manifest, ok, results)
    quarantine = quarantine_frame(manifest, rejected)
    if len(clean) + len(quarantine) != len(manifest):  # the no-silent-drop promise
        raise AssertionError(
            f"validate lost rows: {len(clean)} clean + {len(quarantine)} quarantined != {len(manifest)}"
        )
    elapsed = time.perf_counter() - start
    metrics = validate_metrics(manifest, clean, quarantine, pair_rows, elapsed, all_pairs=all_pairs)
    log.info(
        "validate: %d in, %d clean, %d quarantined, %d fixed (%.0f images/s)",
        len(manifest),
        len(clean),
        len(quarantine),
        int(metrics["n_fixed"]),
        metrics["images_per_s"],
    )
    return ValidateResult(clean, quarantine, metrics, pairs_frame(pair_rows))


#: row -> (reason, detail, detected format)
_Rejection = tuple[str, str, str | None]


def _check_manifest(manifest: pd.DataFrame) -> None:
    for col in (schema.IMAGE_ID, schema.ITEM_ID, schema.PATH):
        if col not in manifest.columns:
            raise CatalogError(f"manifest has no {col!r} column")
    if manifest[schema.IMAGE_ID].duplicated().any():
        dups = manifest.loc[manifest[schema.IMAGE_ID].duplicated(), schema.IMAGE_ID]
        raise CatalogError(f"duplicate image_id in manifest: {sorted(map(str, dups))[:5]}")


def _drop_exact_duplicates(
    ok: list[int],
    results: list[dict[str, Any]],
    image_ids: list[str],
    rejected: dict[int, _Rejection],
) -> list[int]:
    """The same bytes twice: keep the first, reject the others; returns the rows still ok."""
    first_by_sha: dict[str, int] = {}
    for i in ok:
        sha = results[i]["sha256"]
        if sha in first_by_sha:
            kept = first_by_sha[sha]
            rejected[i] = (
                "duplicate_exact",
                f"same sha256 as {image_ids[kept]}",
                results[i]["format"],
            )
        else:
            first_by_sha[sha] = i
    return [i for i in ok if i not in rejected]


def _drop_near_duplicates(
    ok: list[int],
    results: list[dict[str, Any]],
    image_ids: list[str],
    item_ids: list[str],
    rejected: dict[int, _Rejection],
    cfg: ValidateConfig,
    *,
    all_pairs: bool,
) -> tuple[list[int], list[dict[str, Any]]]:
    """Perceptual-hash neighbours, greedy in manifest order; returns (rows still ok, pair rows)."""
    pairs = near_pairs(
        [results[i]["phash"] for i in ok],
        [item_ids[i] for i in ok],
        cfg.near_duplicate_distance,
        all_pairs=all_pairs,
    )
    dropped_by: dict[int, tuple[int, int]] = {}
    for a, b, dist in pairs:  # sorted by b then a: the earliest kept partner wins
        ia, ib = ok[a], ok[b]
        droppable = cfg.near_duplicate_scope == "all" or (
            cfg.near_duplicate_scope == "item" and item_ids[ia] == item_ids[ib]
        )
        if droppable and ib not in dropped_by and ia not in dropped_by:
            dropped_by[ib] = (ia, dist)
    for ib, (ia, dist) in dropped_by.items():
        rejected[ib] = (
            "duplicate_near",
            f"phash distance {dist} to {image_ids[ia]} (item {item_ids[ia]})",
            results[ib]["format"],
        )
    pair_rows = [
        {
            "image_id_a": image_ids[ok[a]],
            "item_id_a": item_ids[ok[a]],
            "image_id_b": image_ids[ok[b]],
            "item_id_b": item_ids[ok[b]],
            "distance": dist,
            "same_item": item_ids[ok[a]] == item_ids[ok[b]],
            "action": "dropped" if dropped_by.get(ok[b], (None,))[0] == ok[a] else "reported",
        }
        for a, b, dist in pairs
    ]
    return [i for i in ok if i not in rejected], pair_rows


def _cap_per_item(
    ok: list[int],
    results: list[dict[str, Any]],
    item_ids: list[str],
    rejected: dict[int, _Rejection],
    cap: int,
) -> list[int]:
    """Keep the first ``cap`` images of each item, in manifest order; returns the rows still ok."""
    per_item: Counter[str] = Counter()
    for i in ok:
        per_item[item_ids[i]] += 1
        if per_item[item_ids[i]] > cap:
            rejected[i] = (
                "over_item_cap",
                f"item {item_ids[i]} already has {cap} images",
                results[i]["format"],
            )
    return [i for i in ok if i not in rejected]


def inspect_file(path: str | None, cfg: ValidateConfig, clean_dir: Path) -> dict[str, Any]:
    """One file -> its validate columns, or ``{"reason", "detail", "detected_format"}``.

    Never raises for a bad file. Writes the normalised PNG copy when something was fixed.
    """
    if path is None:
        return {"reason": "unreadable", "detail": "no path", "detected_format": None}
    try:
        data = read_bytes(path, cfg.max_bytes)
    except ImageRejected as exc:
        return {"reason": exc.reason, "detail": safe_text(exc.detail), "detected_format": None}
    except OSError as exc:
        return {
            "reason": "unreadable",
            "detail": safe_text(f"{type(exc).__name__}: {exc.strerror or exc}"),
        }
    sha = hashlib.sha256(data).hexdigest()
    try:
        loaded = load_image(
            data, min_size=cfg.min_size, max_pixels=cfg.max_pixels, filename=os.path.basename(path)
        )
        phash = str(imagehash.phash(loaded.image, hash_size=cfg.phash_size))
    except ImageRejected as exc:
        return {
            "reason": exc.reason,
            "detail": safe_text(exc.detail),
            "detected_format": exc.detected_format,
        }
    except Exception as exc:  # noqa: BLE001 - one file must never stop the batch
        log.exception("unexpected error validating %s", safe_text(path))
        return {"reason": "unexpected_error", "detail": safe_text(f"{type(exc).__name__}: {exc}")}
    image = loaded.image
    out: dict[str, Any] = {
        "sha256": sha,
        "format": loaded.format,
        "width": image.width,
        "height": image.height,
        "fixes": loaded.fixes,
        "phash": phash,
        "clean_path": None,
    }
    if loaded.fixes:
        out["clean_path"] = str(write_clean_copy(image, sha, clean_dir))
    return out


def write_clean_copy(image: Any, sha256: str, clean_dir: Path) -> Path:
    """Atomically write ``image`` as ``clean_dir/<sha[:2]>/<sha256>.png``; returns the path."""
    dest = Path(clean_dir) / sha256[:2] / f"{sha256}.png"
    with atomic_writer(dest, durable=False) as fh:  # a cache: speed over size and durability
        image.save(fh, "PNG", compress_level=1)
    return dest


def _inspect_all(
    paths: list[str | None], cfg: ValidateConfig, clean_dir: Path
) -> list[dict[str, Any]]:
    bar = tqdm(total=len(paths), desc="validate", unit="img", mininterval=1.0)
    try:
        if cfg.workers <= 1 or len(paths) < 4 * cfg.workers:
            out = []
            for p in paths:
                out.append(inspect_file(p, cfg, clean_dir))
                bar.update()
            return out
        # Processes, not threads: decoding is CPU-bound, and warnings.catch_warnings (used to
        # escalate DecompressionBombWarning) is not thread-safe before Python 3.14. "fork" where
        # it exists: "spawn" would re-import the caller's __main__ (scripts without a main guard).
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        chunk = max(1, min(64, len(paths) // (cfg.workers * 8)))
        with concurrent.futures.ProcessPoolExecutor(cfg.workers, mp_context=ctx) as pool:
            out = []
            for res in pool.map(
                inspect_file,
                paths,
                [cfg] * len(paths),
                [clean_dir] * len(paths),
                chunksize=chunk,
            ):
                out.append(res)
                bar.update()
            return out
    finally:
        bar.close()
