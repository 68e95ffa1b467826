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

Query-time speed (:mod:`imgsearch.search.query`): each query runs on ``torch_threads`` intra-op threads
(default 1: steadiest on a shared host) through the ``serving_mode`` forward pass (default
``fused``: BN folded, channels-last; ``int8`` on request, calibrated on gallery images). Both come
from the model config or the environment (``IMGSEARCH_TORCH_THREADS``, ``IMGSEARCH_SERVING_MODE``,
which win), and each speed-up is kept only when it passes its cosine check against eager fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

from imgsearch import schema
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import fingerprint, load_extractor
from imgsearch.search.index import ImageIndex
from imgsearch.search.ranking import RankingConfig, RankingTable, rank
from registry import (
    bundled_attributes,
    served_feedback,
    served_rerank,
    serving_guard,
    text_queries,
)
from registry.decoding import (
    CALIBRATION_IMAGES,
    MAX_IMAGE_BYTES,
    _allow_paths,
    _decode_some,
    _embed,
    _image_values,
    _jsonable,
    _limits,
    decode_images,
    gallery_images,
    image_bytes,
    prepare_serving,
)
from registry.integrity import verify_loaded
from registry.params import (
    DEFAULT_K,
    IMAGE_COLUMN,
    MAX_K,
    PARAM_TYPES,
    TEXT_WEIGHT,
    _as_float,
    _invalid,
    feedback_for_request,
    index_signature,
    param_defaults,
    ranking_for_request,
    read_ranking,
)

# The public names, with the decoding and request-param ones re-exported from registry.decoding
# and registry.params (used as models.<name> by registry.register, registry.search, tests).
__all__ = [
    "ARTIFACT_EXTRACTOR",
    "ARTIFACT_INDEX",
    "ARTIFACT_RANKING",
    "CALIBRATION_IMAGES",
    "DEFAULT_K",
    "EMBEDDING",
    "ERROR",
    "IMAGE_COLUMN",
    "MAX_IMAGE_BYTES",
    "MAX_K",
    "PARAM_TYPES",
    "QUERY",
    "RANK",
    "RESULT_COLUMNS",
    "SCORE",
    "SIMILARITY",
    "TEXT_WEIGHT",
    "ExtractorModel",
    "IndexModel",
    "decode_images",
    "extractor_signature",
    "gallery_images",
    "image_bytes",
    "index_signature",
    "param_defaults",
    "prepare_serving",
    "ranking_for_request",
    "read_ranking",
]

log = logging.getLogger(__name__)

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

#: Catalog columns that describe the server's files and bookkeeping, not the hit: never answered.
SERVER_ONLY_COLUMNS = frozenset(
    {
        schema.PATH,
        schema.PRE_PATH,
        schema.URI,
        schema.SPLIT,
        schema.SHA256,
        schema.PHASH,
        schema.FIXES,
        schema.FORMAT,
    }
)

ARTIFACT_EXTRACTOR = "extractor"
ARTIFACT_INDEX = "index"
ARTIFACT_RANKING = "ranking"


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


class IndexModel(PythonModel):
    """Image queries -> ranked gallery hits, one output row per (query, rank).

    Columns: ``query`` (input row number), ``rank`` (1-based), ``image_id``, ``item_id``,
    ``score`` (after ranking), ``similarity`` (cosine), ``item_name``, ``category``, the index's
    other metadata columns, and ``error`` (``None``, or why that query has no results). With a
    bundled reranker (:mod:`registry.served_rerank`) ``rank`` is the reranked one, and
    ``first_rank`` and ``rerank_score`` are answered too; with bundled attribute heads
    (:mod:`registry.bundled_attributes`) an image query's rows end with
    ``predicted_<attribute>`` and ``predicted_<attribute>_probability``.
    """

    def load_context(self, context: Any) -> None:
        # the registry's checksums (not index.json's), before torch or FAISS parses a byte
        optional = (
            *text_queries.TEXT_ARTIFACTS,
            served_rerank.ARTIFACT_RERANKER,
            bundled_attributes.ARTIFACT_ATTRIBUTES,
        )
        parts = tuple(a for a in optional if a in context.artifacts)
        verify_loaded(context, (ARTIFACT_EXTRACTOR, ARTIFACT_INDEX, *parts))
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
        # int8 (on request) is checked by searching this index with fp32 and int8 queries
        self.serving = prepare_serving(
            self.extractor, context, self.index.meta, lambda q, k: self.index.search(q, k)[1]
        )
        # refuses a text encoder aligned to another extractor (ExtractorMismatchError)
        self.text = text_queries.TextSide.load(dict(context.artifacts), self.fingerprint)
        # optional: off unless the model config or the environment names a store
        self.impressions = served_feedback.ImpressionHook.from_context(context, ARTIFACT_INDEX)
        # the champion reranker `imgsearch serve` bundled into its copy (registry.served_rerank)
        self.reranker = served_rerank.ServedReranker.from_context(context)
        # the attribute heads it bundled (registry.bundled_attributes), on this extractor
        self.attributes = bundled_attributes.BundledAttributes.from_context(
            context, self.extractor, self.fingerprint
        )
        serving_guard.install()

    def _queries(
        self, model_input: Any, text_weight: float
    ) -> tuple[np.ndarray, list[int], list[str | None], set[int], list[Image.Image | None]]:
        """One vector per usable row (image, text, or both mixed), its row numbers, per-row
        errors, the rows that hold a text (they skip flagged images), and the decoded images of
        an image-only request (empty otherwise), for the attribute heads to reuse."""
        if not text_queries.has_text(model_input):
            images, image_only_errors = decode_images(
                _image_values(model_input), allow_paths=self.allow_paths, limits=self.limits
            )
            emb, rows = _embed(self.serving, images)
            return emb, rows, image_only_errors, set(), images
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
        return np.stack(vectors).astype(np.float32), rows, errors, set(text_emb), []

    def _rank(
        self,
        emb: np.ndarray,
        rows: list[int],
        k: int,
        cfg: RankingConfig,
        text_rows: set[int],
        exclude: tuple[str, ...] = (),
    ) -> pd.DataFrame:
        """Ranked hits of each query row; text queries skip the images flagged as restricted."""
        flagged = self.text.flagged if self.text is not None and text_rows else frozenset()
        depth = min(k + len(flagged), MAX_K + len(flagged))
        try:
            # 2-D queries: `query` is the row of `emb`
            hits = rank(
                self.index, emb, depth, cfg, exclude_ids=exclude or None, table=self.ranking_table
            )
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
        feedback = feedback_for_request(params)  # liked / disliked / session, popped
        k, cfg = ranking_for_request(self.ranking, params, self.default_k)
        emb, rows, errors, text_rows, images = self._queries(model_input, text_weight)
        frames: list[pd.DataFrame] = []
        if rows:
            emb = served_feedback.moved_queries(self.index, emb, feedback)
            if self.reranker is None:
                hits = self._rank(emb, rows, k, cfg, text_rows, feedback.disliked)
            else:  # more candidates for the reranker to order; the top k are kept
                depth = self.reranker.depth(k)
                hits = self._rank(emb, rows, depth, cfg, text_rows, feedback.disliked)
                hits = self.reranker.apply(hits, k)
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
        rest = [
            c
            for c in out.columns
            if c not in leading and c != ERROR and c not in SERVER_ONLY_COLUMNS
        ]
        out = out[[*leading, *rest, ERROR]].reset_index(drop=True)
        if self.attributes is not None and images:  # an image-only request, decoded once
            out = self.attributes.annotate(out, images)
        out = _jsonable(out)
        self.impressions.log(model_input, out, feedback)
        return out
