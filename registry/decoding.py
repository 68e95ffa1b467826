"""Request decoding for the pyfunc models: image cells -> bounded RGB images -> embeddings.

A cell is base64 text (optionally a ``data:`` URI), raw bytes, or (only when the loader opted in)
a local path; see :mod:`registry.models` for the bad-input policy. Also the serving set-up both
models share (:func:`prepare_serving`, request bounds and path permission from the model config).
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from PIL import Image

from imgsearch import schema
from imgsearch.data.imageio import open_rgb, read_bytes
from imgsearch.data.limits import DecodeLimits, RequestTooLarge, check_request
from imgsearch.errors import ConfigError, ImageRejected
from imgsearch.evaluate.quantization import DEFAULT_TOLERANCE, Search, whole_items
from imgsearch.models.backbones import Extractor
from imgsearch.search import query as serving
from registry.params import IMAGE_COLUMN, _invalid

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # a query image; the decoder has its own pixel limit
_PATH_ERRORS = (OSError, ValueError)


def image_bytes(value: Any, *, allow_paths: bool = False) -> bytes:
    """The raw bytes of one ``image`` cell. Raises :class:`ImageRejected` with a stable reason."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if allow_paths and len(text) < 4096 and _is_file(text):
            data = Path(text).read_bytes()
        else:
            if text.startswith("data:") and "," in text:
                text = text.split(",", 1)[1]
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                hint = "" if allow_paths else " (file paths are disabled for this model)"
                raise ImageRejected("bad_base64", f"not base64-encoded image data{hint}") from exc
    elif value is None or (isinstance(value, float) and math.isnan(value)):
        raise ImageRejected("missing_image", "empty image cell")
    else:
        raise ImageRejected(
            "bad_input_type", f"unsupported image value of type {type(value).__name__}"
        )
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageRejected("too_large", f"{len(data)} bytes > {MAX_IMAGE_BYTES}")
    return data


def _is_file(text: str) -> bool:
    try:
        return os.path.isfile(text)
    except _PATH_ERRORS:
        return False


def _image_values(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            return list(model_input[IMAGE_COLUMN])
        if model_input.shape[1] == 1:
            return list(model_input.iloc[:, 0])
        raise _invalid(
            f"input must have a column {IMAGE_COLUMN!r}; got {list(model_input.columns)}"
        )
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, Mapping) and IMAGE_COLUMN in model_input:
        values = model_input[IMAGE_COLUMN]
        return (
            list(values) if isinstance(values, (list, tuple, np.ndarray, pd.Series)) else [values]
        )
    if isinstance(model_input, (list, tuple, np.ndarray)):
        return list(model_input)
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    raise _invalid(f"unsupported input type {type(model_input).__name__}")


def decode_images(
    values: list[Any], *, allow_paths: bool = False, limits: DecodeLimits | None = None
) -> tuple[list[Image.Image | None], list[str | None]]:
    """Decode every cell safely; a bad cell becomes an error string for that row, never a raise.

    With ``limits``, a request over them (rows, pixels per image or per request, judged from the
    image headers) is refused whole with the reason (HTTP 400) before any pixel is decoded, and
    large images are decoded at a reduced scale (:mod:`imgsearch.data.limits`).
    """
    if limits is not None and len(values) > limits.max_rows:
        raise _invalid(f"request too large: {len(values)} rows > max_rows {limits.max_rows}")
    datas: list[bytes | None] = []
    errors: list[str | None] = []
    for value in values:
        try:
            datas.append(image_bytes(value, allow_paths=allow_paths))
            errors.append(None)
        except ImageRejected as exc:
            datas.append(None)
            errors.append(str(exc))
        except OSError as exc:  # an unreadable path
            datas.append(None)
            errors.append(f"unreadable: {exc.__class__.__name__}")
    if limits is not None:
        try:
            check_request(datas, limits)
        except RequestTooLarge as exc:
            raise _invalid(f"request too large: {exc}") from exc
    reduce_by = limits.reduction if limits is not None else None
    images: list[Image.Image | None] = []
    for row, data in enumerate(datas):
        image = None
        if data is not None:
            try:
                image = open_rgb(data, reduce_by=reduce_by)
            except ImageRejected as exc:
                errors[row] = str(exc)
        images.append(image)
    if values and all(e is not None for e in errors):
        reasons = "; ".join(f"row {i}: {e}" for i, e in enumerate(errors[:5]))
        raise _invalid(f"no usable image in the request ({reasons})")
    return images, errors


def _decode_some(
    values: list[Any], allow_paths: bool, limits: DecodeLimits
) -> tuple[list[Image.Image | None], list[str | None]]:
    """Decode the image cells of a request whose other rows are texts: a bad image fails its
    row only (the texts still make it a usable request)."""
    try:
        return decode_images(values, allow_paths=allow_paths, limits=limits)
    except MlflowException as exc:
        if "no usable image" not in exc.message:
            raise
        errors: list[str | None] = [str(exc.message)] * len(values)
    return [None] * len(values), errors


def _embed(
    served: serving.ServingExtractor, images: list[Image.Image | None]
) -> tuple[np.ndarray, list[int]]:
    """Embeddings of the decoded images and the row numbers they belong to."""
    rows = [i for i, img in enumerate(images) if img is not None]
    emb = served.embed([images[i] for i in rows])  # type: ignore[misc]
    return np.asarray(emb, dtype=np.float32), rows


#: Gallery images read (from the index's ``path`` column) for int8: some to calibrate on, whole
#: items to check MAP@R on (items with two or more images).
CALIBRATION_IMAGES = 32
CHECK_IMAGES = 128


def _read(paths: pd.Series, limit: int | None = None) -> tuple[list[Image.Image], list[int]]:
    """The images of ``paths`` that decode (up to ``limit``), and their positions; unreadable
    ones are skipped."""
    images: list[Image.Image] = []
    positions: list[int] = []
    for position, path in enumerate(paths.astype(str)):
        if limit is not None and len(images) >= limit:
            break
        try:
            images.append(open_rgb(read_bytes(path, MAX_IMAGE_BYTES)))
        except (ImageRejected, OSError, ValueError):
            continue
        positions.append(position)
    return images, positions


def gallery_images(
    meta: pd.DataFrame,
    calibration: int = CALIBRATION_IMAGES,
    check: int = CHECK_IMAGES,
    tolerance: float = DEFAULT_TOLERANCE,
    search: Search | None = None,
) -> serving.Int8Images:
    """Decoded gallery images for serving's int8 (fixed seeded samples of the index's rows, in
    index order): ``check`` = whole items with two or more images (``item_id``; up to ``check``
    images), ``calibration`` = up to ``calibration`` other images. With the index's ``search``,
    the check ranks through the index (each image's own row left out). Files that cannot be
    read are skipped: int8 then falls back when too few remain."""
    if schema.PATH not in meta.columns or meta.empty:
        return serving.Int8Images(tolerance=tolerance)
    id_column = schema.ITEM_ID if schema.ITEM_ID in meta.columns else schema.PATH
    gallery_labels = meta[id_column].astype(str).reset_index(drop=True)
    readable = np.flatnonzero(meta[schema.PATH].notna().to_numpy())
    chosen = readable[whole_items(gallery_labels.iloc[readable], check, seed=0, min_images=2)]
    check_images, read = _read(meta[schema.PATH].iloc[chosen])
    own = chosen[read]
    rest = np.setdiff1d(readable, chosen)
    if len(rest) > 4 * calibration:
        rest = np.sort(np.random.default_rng(0).choice(rest, 4 * calibration, replace=False))
    calibration_images, _ = _read(meta[schema.PATH].iloc[rest], calibration)
    return serving.Int8Images(
        calibration_images,
        check_images,
        gallery_labels.iloc[own].tolist(),
        tolerance,
        own=own.tolist(),
        gallery_labels=gallery_labels.tolist() if search is not None else [],
        search=search,
    )


def prepare_serving(
    extractor: Extractor,
    context: Any,
    gallery: pd.DataFrame | None = None,
    search: Search | None = None,
) -> serving.ServingExtractor:
    """The query-time forward pass, from the model config (``torch_threads``, ``serving_mode``)
    and the environment variables that override it. ``gallery`` (the index's metadata) and
    ``search`` (its search, positions only) are what ``int8`` calibrates and is checked on."""
    config = getattr(context, "model_config", None) or {}
    threads = serving.resolve_threads(config.get("torch_threads"))
    mode = serving.resolve_mode(config.get("serving_mode"))
    images = None
    if mode == "int8" and gallery is not None:
        tolerance = float(config.get("int8_tolerance", DEFAULT_TOLERANCE))
        images = gallery_images(gallery, tolerance=tolerance, search=search)
    served = serving.prepare_serving(extractor, mode, threads=threads, gallery=images)
    log.info("serving %s, %d torch thread(s): %s", served.mode, threads, served.metrics)
    return served


def _jsonable(df: pd.DataFrame) -> pd.DataFrame:
    """Missing values as ``None`` so the scoring server writes valid JSON (``null``, not ``NaN``)."""
    out = df.astype(object)
    return out.where(pd.notna(out), None)


def _limits(context: Any) -> DecodeLimits:
    """Per-request bounds from the model config (defaults for keys it does not log)."""
    try:
        return DecodeLimits.from_config(getattr(context, "model_config", None))
    except ConfigError as exc:
        raise _invalid(f"bad serving limits in the model config: {exc}") from exc


def _allow_paths(context: Any) -> bool:
    config = getattr(context, "model_config", None) or {}
    return bool(config.get("allow_paths", False))
