"""MLflow pyfunc wrappers: the feature extractor and the search index as servable models.

Both take a DataFrame with one column, ``image``, one query per row. A cell holds the image as
base64 text (optionally a ``data:image/...;base64,`` URI), raw ``bytes``, or, only when the loader
opted in with ``model_config={"allow_paths": True}``, a local file path. Paths are off by default
because a served model must not read files named by whoever sends the request.

Bad input policy (the server keeps serving in every case):

* one bad image in a batch: that query gets one row with an ``error`` reason (``ImageRejected``'s
  stable code plus detail) and no results; the other queries are answered;
* a good image that no gallery row passes the filters for (``category``, ``exclude_nsfw``): one
  row with ``error`` = ``no_results: ...``;
* every image in the request bad (a single garbage upload, say), or a bad ``params`` value:
  :class:`mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE``, which the scoring
  server turns into an HTTP 400 carrying the reason.

:class:`IndexModel` loads its index with the fingerprint of the extractor it is logged with, so a
pair that does not belong together is refused at load time (``ExtractorMismatchError``), and a
tampered index file is refused before FAISS reads it (``IndexIntegrityError``).

Query-time speed (:mod:`imgsearch.embed.query`): each query runs on ``torch_threads`` intra-op threads
(default 1: steadiest on a shared host) through the ``serving_mode`` forward pass (default
``fused``: BN folded, channels-last; ``int8`` on request, calibrated on gallery images). Both come
from the model config or the environment (``IMGSEARCH_TORCH_THREADS``, ``IMGSEARCH_SERVING_MODE``,
which win), and each speed-up is kept only when it passes its cosine check against eager fp32.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from imgsearch import schema
from imgsearch.config import from_dict
from imgsearch.data.imageio import open_rgb, read_bytes
from imgsearch.data.limits import DecodeLimits, RequestTooLarge, check_request
from imgsearch.embed import query as serving
from imgsearch.errors import ConfigError, ImageRejected
from imgsearch.models.backbones import Extractor, fingerprint, load_extractor
from imgsearch.search.index import ImageIndex
from imgsearch.search.ranking import RankingConfig, RankingTable, rank
from registry import serving_guard, text_queries
from registry.integrity import verify_loaded

log = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
QUERY = "query"
RANK = "rank"
SCORE = "score"
SIMILARITY = "similarity"
ERROR = "error"
EMBEDDING = "embedding"
#: The leading output columns of :class:`IndexModel`; index metadata columns follow, then ``error``.
RESULT_COLUMNS = (
    QUERY,
    RANK,
    schema.IMAGE_ID,
    schema.ITEM_ID,
    SCORE,
    SIMILARITY,
    schema.ITEM_NAME,
    schema.CATEGORY,
)

ARTIFACT_EXTRACTOR = "extractor"
ARTIFACT_INDEX = "index"
ARTIFACT_RANKING = "ranking"

MAX_K = 1000
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # a query image; the decoder has its own pixel limit
_PATH_ERRORS = (OSError, ValueError)


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# --- input decoding ----------------------------------------------------------------------------


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


#: Gallery images read (from the index's ``path`` column) to calibrate and check int8.
CALIBRATION_IMAGES = 32


def gallery_images(meta: pd.DataFrame, n: int = CALIBRATION_IMAGES) -> list[Image.Image]:
    """Up to ``n`` decoded gallery images (a fixed sample of the index's ``path`` column); files
    that cannot be read are skipped: ``int8`` then falls back when too few remain."""
    if schema.PATH not in meta.columns or meta.empty:
        return []
    paths = meta[schema.PATH].dropna().astype(str)
    sample = paths.sample(min(len(paths), 4 * n), random_state=0) if len(paths) > n else paths
    images: list[Image.Image] = []
    for path in sample:
        try:
            images.append(open_rgb(read_bytes(path, MAX_IMAGE_BYTES)))
        except (ImageRejected, OSError, ValueError):
            continue
        if len(images) >= n:
            break
    return images


def prepare_serving(
    extractor: Extractor, context: Any, gallery: pd.DataFrame | None = None
) -> serving.ServingExtractor:
    """The query-time forward pass, from the model config (``torch_threads``, ``serving_mode``)
    and the environment variables that override it."""
    config = getattr(context, "model_config", None) or {}
    threads = serving.resolve_threads(config.get("torch_threads"))
    mode = serving.resolve_mode(config.get("serving_mode"))
    images = gallery_images(gallery) if mode == "int8" and gallery is not None else []
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


# --- the extractor -----------------------------------------------------------------------------


class ExtractorModel(PythonModel):
    """Image -> L2-normalised embedding, preprocessed the way the extractor's spec says.

    Output: a DataFrame with ``embedding`` (list of float, or ``None``) and ``error`` per input row.
    """

    def load_context(self, context: Any) -> None:
        # the registry's checksums, before torch.load reads the weights
        verify_loaded(context, (ARTIFACT_EXTRACTOR,))
        self.extractor = load_extractor(Path(context.artifacts[ARTIFACT_EXTRACTOR]))
        self.extractor.eval()
        self.fingerprint = fingerprint(self.extractor)
        self.allow_paths = _allow_paths(context)
        self.limits = _limits(context)
        self.serving = prepare_serving(self.extractor, context)
        serving_guard.install()

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        images, errors = decode_images(
            _image_values(model_input), allow_paths=self.allow_paths, limits=self.limits
        )
        emb, rows = _embed(self.serving, images)
        vectors: list[list[float] | None] = [None] * len(images)
        for row, vec in zip(rows, emb, strict=True):
            vectors[row] = vec.tolist()
        return _jsonable(pd.DataFrame({EMBEDDING: vectors, ERROR: errors}))


def extractor_signature() -> ModelSignature:
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]))


# --- the index ---------------------------------------------------------------------------------

#: Request params: name -> (MLflow type, RankingConfig field it sets or None for k/category).
PARAM_TYPES: dict[str, str] = {
    "k": "long",
    "popularity_weight": "double",
    "exclude_nsfw": "boolean",
    "category": "string",
    "mmr_lambda": "double",
    "one_per_item": "boolean",
}
DEFAULT_K = 10
TEXT_WEIGHT = "text_weight"


def index_signature(
    ranking: RankingConfig, k: int = DEFAULT_K, text: bool = False
) -> ModelSignature:
    """Input ``image`` (string) and ranking params whose defaults are the logged ranking config.

    With ``text`` (the model ships an aligned text encoder) the columns are ``image``, ``text``
    and ``lang``, each optional per request, and the param ``text_weight`` mixes a row that has
    both (:mod:`registry.text_queries`).

    ``category`` is a comma-separated list of categories to keep ('' = all); ``mmr_lambda`` is
    the relevance/diversity trade-off of maximal marginal relevance (see :mod:`imgsearch.search.ranking`).
    """
    defaults = param_defaults(ranking, k)
    specs = [ParamSpec(name, PARAM_TYPES[name], defaults[name]) for name in PARAM_TYPES]
    if not text:
        return ModelSignature(
            inputs=Schema([ColSpec("string", IMAGE_COLUMN)]), params=ParamSchema(specs)
        )
    specs.append(ParamSpec(TEXT_WEIGHT, "double", text_queries.DEFAULT_TEXT_WEIGHT))
    columns = [
        ColSpec("string", name, required=False)
        for name in (IMAGE_COLUMN, text_queries.TEXT_COLUMN, text_queries.LANG_COLUMN)
    ]
    return ModelSignature(inputs=Schema(columns), params=ParamSchema(specs))


def param_defaults(ranking: RankingConfig, k: int = DEFAULT_K) -> dict[str, Any]:
    categories = getattr(ranking, "categories", None) or []
    if isinstance(categories, str):
        categories = [categories]
    mmr = getattr(ranking, "mmr_lambda", None)
    return {
        "k": int(k),
        "popularity_weight": float(getattr(ranking, "popularity_weight", 0.0) or 0.0),
        "exclude_nsfw": bool(getattr(ranking, "exclude_nsfw", False)),
        "category": ",".join(str(c) for c in categories),
        # None (MMR off) cannot be a param default; 1.0 is pure relevance, the same ranking.
        "mmr_lambda": 1.0 if mmr is None else float(mmr),
        "one_per_item": bool(getattr(ranking, "one_per_item", False)),
    }


def ranking_for_request(
    base: RankingConfig, params: Mapping[str, Any] | None, default_k: int = DEFAULT_K
) -> tuple[int, RankingConfig]:
    """``(k, config)`` for one request: ``base`` with the request's params applied, validated."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAM_TYPES))
    if unknown:
        raise _invalid(f"unknown params {unknown}; known: {sorted(PARAM_TYPES)}")
    k = _as_int(params.get("k", default_k), "k")
    if not 1 <= k <= MAX_K:
        raise _invalid(f"k must be in [1, {MAX_K}], got {k}")
    changes: dict[str, Any] = {}
    if "popularity_weight" in params:
        changes["popularity_weight"] = _as_float(params["popularity_weight"], "popularity_weight")
    if "mmr_lambda" in params:
        value = _as_float(params["mmr_lambda"], "mmr_lambda")
        if not 0.0 <= value <= 1.0:
            raise _invalid(f"mmr_lambda must be in [0, 1], got {value}")
        # 1.0 is pure relevance, the same order as no MMR: skip the re-ranking work
        changes["mmr_lambda"] = None if value >= 1.0 else value
    for flag in ("exclude_nsfw", "one_per_item"):
        if flag in params:
            changes[flag] = _as_bool(params[flag], flag)
    if "category" in params:
        raw = params["category"]
        items = raw if isinstance(raw, (list, tuple)) else str(raw or "").split(",")
        changes["categories"] = [str(c).strip() for c in items if str(c).strip()] or None
    fields = {f.name for f in dataclasses.fields(base)}
    missing = sorted(set(changes) - fields)
    if missing:
        raise _invalid(f"this index's ranking does not support {missing}")
    try:
        return k, dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as exc:
        raise _invalid(f"bad ranking params: {exc}") from exc


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise _invalid(f"{name} must be an integer, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise _invalid(f"{name} must be an integer, got {value!r}") from exc
    if not number.is_integer():
        raise _invalid(f"{name} must be an integer, got {value!r}")
    return int(number)


def _as_float(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise _invalid(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise _invalid(f"{name} must be finite, got {value!r}")
    return number


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise _invalid(f"{name} must be a boolean, got {value!r}")


def read_ranking(path: Path | None) -> RankingConfig:
    if path is None or not Path(path).exists():
        return RankingConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return from_dict(RankingConfig, data)


class IndexModel(PythonModel):
    """Image queries -> ranked gallery hits, one output row per (query, rank).

    Columns: ``query`` (input row number), ``rank`` (1-based), ``image_id``, ``item_id``,
    ``score`` (after ranking), ``similarity`` (cosine), ``item_name``, ``category``, the index's
    other metadata columns, and ``error`` (``None``, or why that query has no results).
    """

    def load_context(self, context: Any) -> None:
        # the registry's checksums (not index.json's), before torch or FAISS parses a byte
        text_parts = tuple(a for a in text_queries.TEXT_ARTIFACTS if a in context.artifacts)
        verify_loaded(context, (ARTIFACT_EXTRACTOR, ARTIFACT_INDEX, *text_parts))
        self.extractor = load_extractor(Path(context.artifacts[ARTIFACT_EXTRACTOR]))
        self.extractor.eval()
        self.fingerprint = fingerprint(self.extractor)
        # Refuses an index made by another extractor, and a tampered file before FAISS reads it.
        self.index = ImageIndex.load(
            Path(context.artifacts[ARTIFACT_INDEX]), expected_extractor_fingerprint=self.fingerprint
        )
        self.ranking_table = RankingTable.from_index(self.index)  # ranking's arrays, made once
        ranking_path = context.artifacts.get(ARTIFACT_RANKING)
        self.ranking = read_ranking(Path(ranking_path) if ranking_path else None)
        self.allow_paths = _allow_paths(context)
        config = getattr(context, "model_config", None) or {}
        self.default_k = int(config.get("default_k", DEFAULT_K))
        self.limits = _limits(context)
        self.serving = prepare_serving(self.extractor, context, self.index.meta)
        # refuses a text encoder aligned to another extractor (ExtractorMismatchError)
        self.text = text_queries.TextSide.load(dict(context.artifacts), self.fingerprint)
        serving_guard.install()

    def _queries(
        self, model_input: Any, text_weight: float
    ) -> tuple[np.ndarray, list[int], list[str | None], set[int]]:
        """One vector per usable row (image, text, or both mixed), its row numbers, per-row
        errors, and the rows that hold a text (they skip flagged images)."""
        if not text_queries.has_text(model_input):
            images, errors = decode_images(
                _image_values(model_input), allow_paths=self.allow_paths, limits=self.limits
            )
            emb, rows = _embed(self.serving, images)
            return emb, rows, errors, set()
        if self.text is None:
            raise _invalid("this index model has no text encoder: send images, or run `align`")
        texts, langs = text_queries.text_cells(model_input, len(model_input))
        self.text.check(texts, langs)  # a restricted word refuses the whole request (HTTP 400)
        cells = list(model_input[IMAGE_COLUMN]) if IMAGE_COLUMN in model_input.columns else []
        cells += [None] * (len(texts) - len(cells))
        with_image = [i for i, c in enumerate(cells) if text_queries._cell(c) is not None]
        errors: list[str | None] = [None] * len(texts)
        image_emb: dict[int, np.ndarray] = {}
        if with_image:
            images, image_errors = _decode_some(
                [cells[i] for i in with_image], self.allow_paths, self.limits
            )
            for j, err in enumerate(image_errors):
                errors[with_image[j]] = err
            if any(img is not None for img in images):
                emb, rows = _embed(self.serving, images)
                image_emb = {with_image[r]: e for r, e in zip(rows, emb, strict=True)}
        text_emb = self.text.embed(texts)
        vectors, rows = [], []
        for i in range(len(texts)):
            if errors[i] is not None:  # its image failed: the row fails, texts or not
                continue
            vec = text_queries.combine(image_emb.get(i), text_emb.get(i), text_weight)
            if vec is None:
                errors[i] = errors[i] or "missing_query: a row needs an image or a text"
                continue
            vectors.append(vec)
            rows.append(i)
        if not vectors:
            reasons = "; ".join(f"row {i}: {e}" for i, e in enumerate(errors[:5]) if e)
            raise _invalid(f"no usable query in the request ({reasons})")
        return np.stack(vectors).astype(np.float32), rows, errors, set(text_emb)

    def _rank(
        self, emb: np.ndarray, rows: list[int], k: int, cfg: RankingConfig, text_rows: set[int]
    ) -> pd.DataFrame:
        """Ranked hits of each query row; text queries skip the images flagged as restricted."""
        flagged = self.text.flagged if self.text is not None and text_rows else frozenset()
        depth = min(k + len(flagged), MAX_K + len(flagged))
        try:
            # 2-D queries: `query` is the row of `emb`
            hits = rank(self.index, emb, depth, cfg, table=self.ranking_table)
        except (ConfigError, ValueError) as exc:  # e.g. a category filter on an index without one
            raise _invalid(f"cannot rank: {exc}") from exc
        hits[QUERY] = np.asarray(rows, dtype=np.int64)[hits[QUERY].to_numpy(dtype=np.int64)]
        if flagged:
            drop = hits[QUERY].isin(text_rows) & hits[schema.IMAGE_ID].astype(str).isin(flagged)
            hits = hits[~drop].copy()
            hits[RANK] = hits.groupby(QUERY).cumcount() + 1
        hits = hits[hits[RANK] <= k]
        hits[ERROR] = None
        return hits

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        params = dict(params or {})
        text_weight = _as_float(
            params.pop(TEXT_WEIGHT, text_queries.DEFAULT_TEXT_WEIGHT), TEXT_WEIGHT
        )
        if not 0.0 <= text_weight <= 1.0:
            raise _invalid(f"{TEXT_WEIGHT} must be in [0, 1], got {text_weight}")
        k, cfg = ranking_for_request(self.ranking, params, self.default_k)
        emb, rows, errors, text_rows = self._queries(model_input, text_weight)
        frames: list[pd.DataFrame] = []
        if rows:
            hits = self._rank(emb, rows, k, cfg, text_rows)
            frames.append(hits)
            for i in sorted(set(rows) - set(hits[QUERY])):  # a query the filters left empty
                errors[i] = "no_results: no gallery image passes the ranking filters"
        failed = [i for i, err in enumerate(errors) if err is not None]
        if failed:
            frames.append(pd.DataFrame({QUERY: failed, ERROR: [errors[i] for i in failed]}))
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        for column in (*RESULT_COLUMNS, ERROR):
            if column not in out.columns:
                out[column] = None
        out = out.sort_values([QUERY, RANK], kind="stable", na_position="first")
        leading = [*RESULT_COLUMNS]
        rest = [c for c in out.columns if c not in leading and c != ERROR]
        return _jsonable(out[[*leading, *rest, ERROR]].reset_index(drop=True))
