"""Extraction with an int8 extractor, kept only where it keeps retrieval quality (issue #16 §2).

``extract.precision: int8`` runs :func:`extract_int8`:

1. calibrate: quantise the extractor (:func:`imgsearch.models.quantize.quantize`, ONNX Runtime)
   on up to ``calibration_images`` images of the ``train`` split (seeded sample);
2. check: embed up to ``check_images`` images of the ``val`` split (whole items, seeded) with
   fp32 and with int8, and compare their MAP@R
   (:func:`imgsearch.evaluate.quantization.quality_check`): int8 is kept when both int8 figures
   (all int8; fp32 queries against int8 vectors, as serving stays fp32) are at most
   ``tolerance`` below fp32's;
3. extract the whole manifest with int8 when kept, else with fp32.

Metrics say what happened: ``int8_used``, ``int8_map_at_r_fp32``, ``int8_map_at_r_int8``,
``int8_map_at_r_mixed`` (fp32 queries against int8 vectors: serving stays fp32),
``int8_map_at_r_drop`` (fp32 minus the worse of the two), ``int8_min_cosine``, ``int8_mean_cosine``, ``int8_check_images``,
``int8_calibration_images``, ``int8_quantize_s``, ``int8_check_s`` and the text ``int8_reason``
(why int8 was kept or refused: the check failed, no split to calibrate or check on, the backbone
would not export or quantise). A missing ONNX Runtime is an error
(:class:`~imgsearch.models.quantize.QuantizationUnavailableError`), not a fallback: int8 was
asked for and cannot even be tried.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from imgsearch import schema
from imgsearch.config import from_dict
from imgsearch.data.preprocess import to_tensor
from imgsearch.embed.extract import ExtractConfig, ExtractResult, extract, resolve_parallelism
from imgsearch.embed.reader import ManifestReader
from imgsearch.errors import ConfigError
from imgsearch.evaluate.quantization import DEFAULT_TOLERANCE, quality_check, whole_items
from imgsearch.models.backbones import Extractor
from imgsearch.models.quantize import (
    QuantizationError,
    QuantizationUnavailableError,
    QuantizeConfig,
    QuantizedExtractor,
    quantize,
    require_onnxruntime,
)

log = logging.getLogger(__name__)


@dataclass
class Int8Config:
    """``extract.int8`` settings (``configs/extract.yaml``).

    ``tolerance``: largest MAP@R drop (fp32 - int8) on the check images that keeps int8.
    ``calibration_split``/``check_split``: where calibration and check images come from.
    ``activation``/``per_channel``/``calibration_method``: see
    :class:`~imgsearch.models.quantize.QuantizeConfig`.
    """

    tolerance: float = DEFAULT_TOLERANCE
    calibration_images: int = 256
    check_images: int = 2000
    calibration_split: str = "train"
    check_split: str = "val"
    activation: str = "uint8"
    per_channel: bool = True
    calibration_method: str = "minmax"
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.tolerance, int | float) and self.tolerance >= 0):
            raise ConfigError(f"extract.int8.tolerance must be >= 0, got {self.tolerance!r}")
        for name in ("calibration_images", "check_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"extract.int8.{name} must be an int >= 1, got {value!r}")
        self.quantize_config()  # validates activation, calibration_method

    def quantize_config(self) -> QuantizeConfig:
        return QuantizeConfig(
            activation=self.activation,
            per_channel=self.per_channel,
            calibration_method=self.calibration_method,
        )


def calibration_rows(manifest: pd.DataFrame, cfg: Int8Config) -> pd.DataFrame:
    """Up to ``cfg.calibration_images`` rows of the calibration split (seeded sample)."""
    rows = manifest[manifest[schema.SPLIT] == cfg.calibration_split]
    if len(rows) > cfg.calibration_images:
        rows = rows.sample(n=cfg.calibration_images, random_state=cfg.seed)
    return rows.reset_index(drop=True)


def check_rows(manifest: pd.DataFrame, cfg: Int8Config) -> pd.DataFrame:
    """Rows of the check split, whole items in a seeded order, up to ``cfg.check_images``."""
    rows = manifest[manifest[schema.SPLIT] == cfg.check_split]
    return rows[whole_items(rows[schema.ITEM_ID], cfg.check_images, cfg.seed)].reset_index(
        drop=True
    )


def read_pixels(manifest: pd.DataFrame, extractor: Extractor, batch_size: int) -> torch.Tensor:
    """The readable rows of ``manifest`` as float ``(N, 3, S, S)``, preprocessed for ``extractor``."""
    reader = ManifestReader(extractor.spec.preprocess, batch_size, 0)
    parts = [
        to_tensor(batch.pixels, extractor.spec.preprocess)
        for batch in reader(manifest)
        if batch.indices
    ]
    size = extractor.spec.preprocess.size
    return torch.cat(parts) if parts else torch.empty(0, 3, size, size)


def calibrate_and_check(
    extractor: Extractor, manifest: pd.DataFrame, cfg: ExtractConfig, int8: Int8Config
) -> tuple[QuantizedExtractor | None, dict[str, Any]]:
    """Quantise on the calibration split and check MAP@R on the check split.

    Returns ``(quantized or None, metrics)``: None (with ``int8_reason``) when int8 is refused.
    Raises :class:`QuantizationUnavailableError` without ONNX Runtime.
    """
    metrics: dict[str, Any] = {"int8_tolerance": float(int8.tolerance)}
    if schema.SPLIT not in manifest.columns:
        return None, {**metrics, "int8_reason": "no split column: nothing to calibrate or check on"}
    calibration = calibration_rows(manifest, int8)
    check = check_rows(manifest, int8)
    if calibration.empty or check.empty:
        reason = (
            f"{len(calibration)} {int8.calibration_split!r} images to calibrate on, "
            f"{len(check)} {int8.check_split!r} images to check on: both are needed"
        )
        return None, {**metrics, "int8_reason": reason}
    _, threads = resolve_parallelism(cfg)
    start = time.perf_counter()
    try:
        pixels = read_pixels(calibration, extractor, cfg.batch_size)
        if len(pixels) == 0:
            return None, {**metrics, "int8_reason": "no calibration image could be read"}
        quantized = quantize(extractor, pixels, int8.quantize_config(), threads=threads)
    except QuantizationUnavailableError:
        raise
    except QuantizationError as exc:
        log.warning("int8: %s; running fp32", exc)
        return None, {**metrics, "int8_reason": str(exc)[:500]}
    metrics["int8_quantize_s"] = time.perf_counter() - start
    metrics["int8_calibration_images"] = float(len(pixels))

    start = time.perf_counter()
    fp32_cfg = dataclasses.replace(cfg, precision="fp32", compile=False)
    ref = extract(extractor, check, fp32_cfg, progress=False)
    low = extract(quantized, check, fp32_cfg, progress=False)
    both = np.intersect1d(ref.ids.astype(str), low.ids.astype(str))
    ref_pos = pd.Index(ref.ids.astype(str)).get_indexer(both)
    low_pos = pd.Index(low.ids.astype(str)).get_indexer(both)
    labels = check.set_index(check[schema.IMAGE_ID].astype(str)).loc[both, schema.ITEM_ID]
    result = quality_check(
        ref.embeddings[ref_pos],
        low.embeddings[low_pos],
        labels.astype(str).to_numpy(),
        int8.tolerance,
    )
    metrics["int8_check_s"] = time.perf_counter() - start
    metrics["int8_check_images"] = result["n_images"]
    for key in ("map_at_r_fp32", "map_at_r_int8", "map_at_r_mixed", "map_at_r_drop"):
        metrics[f"int8_{key}"] = result[key]
    for key in ("min_cosine", "mean_cosine"):
        metrics[f"int8_{key}"] = result[key]
    metrics["int8_reason"] = result["reason"]
    metrics["int8_speedup_on_check"] = _speedup(ref.metrics, low.metrics)
    if not result["keep"]:
        log.warning("int8 refused: %s; running fp32", result["reason"])
        return None, metrics
    log.info("int8 kept: %s", result["reason"])
    return quantized, metrics


def _speedup(fp32: dict[str, Any], int8: dict[str, Any]) -> float:
    a, b = float(fp32.get("images_per_s", 0.0)), float(int8.get("images_per_s", 0.0))
    return b / a if a > 0 else math.nan


def extract_int8(
    extractor: Extractor,
    manifest: pd.DataFrame,
    cfg: ExtractConfig,
    *,
    out: Path | None = None,
    progress: bool = True,
) -> ExtractResult:
    """:func:`~imgsearch.embed.extract.extract` with int8 where it passes the MAP@R check, else
    fp32 (see the module docstring); the decision's metrics are merged into the result's.

    Raises :class:`QuantizationUnavailableError` when ONNX Runtime is not installed.
    """
    require_onnxruntime()
    int8 = from_dict(Int8Config, cfg.int8)
    quantized, metrics = calibrate_and_check(extractor, manifest, cfg, int8)
    fp32_cfg = dataclasses.replace(cfg, precision="fp32")
    model: Extractor | QuantizedExtractor = quantized if quantized is not None else extractor
    result = extract(model, manifest, fp32_cfg, out=out, progress=progress)
    result.metrics.update(metrics)
    result.metrics["int8_used"] = float(quantized is not None)
    result.metrics["precision_requested"] = "int8"
    return result
