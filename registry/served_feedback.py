"""What the index pyfunc does with feedback: Rocchio on request, and its impressions hook.

* :func:`moved_queries`: the ``liked`` / ``disliked`` params (result image ids) move each query
  vector by Rocchio (:mod:`imgsearch.search.relevance_feedback`); the disliked ids are then
  excluded from the ranking by the caller. An id the index does not hold is a 400.
* :class:`ImpressionHook`: when the load-time ``model_config`` has ``impressions_url`` or
  ``IMGSEARCH_IMPRESSIONS_URL`` is set (:func:`registry.impressions.hook_url`), every answered
  query's result list is written to the impressions table; otherwise nothing is written, so a
  plain ``mlflow models serve`` needs no store. The versions recorded are the load-time config's
  ``index_version`` / ``extractor_version`` / ``text_version`` / ``reranker_version`` when given,
  else the name and version MLflow writes beside a model it downloads from the registry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
import yaml
from mlflow.exceptions import MlflowException

from imgsearch import schema
from imgsearch.errors import ConfigError, ImgsearchError
from imgsearch.search.index import ImageIndex
from imgsearch.search.relevance_feedback import rocchio, vectors_of
from registry import impressions as imp
from registry import text_queries
from registry.decoding import _image_values, image_bytes
from registry.feedback import query_sha256, text_query_sha256
from registry.params import RequestFeedback, _invalid

log = logging.getLogger(__name__)

_META_FILE = "registered_model_meta"  # MLflow's, beside a model downloaded by models:/ URI


def moved_queries(index: ImageIndex, emb: np.ndarray, fb: RequestFeedback) -> np.ndarray:
    """``emb`` (M, D) moved by the request's liked / disliked ids (unchanged without any)."""
    if not fb:
        return emb
    try:
        liked = vectors_of(index, fb.liked)
        disliked = vectors_of(index, fb.disliked)
        return np.asarray(rocchio(emb, liked, disliked), dtype=np.float32)
    except ValueError as exc:
        raise _invalid(f"relevance feedback: {exc}") from exc


def _registry_versions(config: dict[str, Any], model_root: Path | None) -> imp.Versions:
    found: dict[str, str | None] = {
        key: (None if config.get(f"{key}_version") is None else str(config[f"{key}_version"]))
        for key in ("index", "extractor", "text", "reranker")
    }
    meta = model_root / _META_FILE if model_root is not None else None
    if found["index"] is None and meta is not None and meta.is_file():
        try:
            data = yaml.safe_load(meta.read_text()) or {}
            found["index"] = str(data["model_version"]) if data.get("model_version") else None
        except (OSError, yaml.YAMLError) as exc:
            log.warning("cannot read %s: %s", meta, exc)
    return imp.Versions(**found)


def _query_ids(model_input: Any, n: int) -> list[tuple[str, str | None, str | None]]:
    """Per input row: (sha256 of the query, text, lang); an image by its bytes' hash only."""
    texts, langs = (
        text_queries.text_cells(model_input, n) if text_queries.has_text(model_input) else ([], [])
    )
    try:
        cells = _image_values(model_input) if not texts else [None] * n
    except MlflowException:  # the request was answered; hashing is best effort
        cells = [None] * n
    if texts and isinstance(model_input, pd.DataFrame) and "image" in model_input.columns:
        cells = list(model_input["image"])
    out = []
    for i in range(n):
        text = texts[i] if i < len(texts) else None
        lang = langs[i] if i < len(langs) else None
        data = None
        if i < len(cells) and text_queries._cell(cells[i]) is not None:
            try:
                data = image_bytes(cells[i])
            except (ImgsearchError, OSError):  # an unreadable cell has no hash
                data = None
        if data is not None and text is not None:
            digest = query_sha256(query_sha256(data).encode() + b"\n" + text.encode())
        elif data is not None:
            digest = query_sha256(data)
        else:
            digest = text_query_sha256(text or "", lang)
        out.append((digest, text, lang))
    return out


class ImpressionHook:
    """The served model's optional impressions logging (see the module docstring)."""

    def __init__(self, store: imp.ImpressionStore | None, versions: imp.Versions) -> None:
        self.store = store
        self.versions = versions

    @classmethod
    def from_context(cls, context: Any, artifact: str) -> ImpressionHook:
        config = dict(getattr(context, "model_config", None) or {})
        url = imp.hook_url(config)
        if url is None:
            return cls(None, imp.Versions())
        artifacts = getattr(context, "artifacts", None) or {}
        root = Path(artifacts[artifact]).parent.parent if artifact in artifacts else None
        try:
            store = imp.ImpressionStore(url)
        except (ConfigError, sa.exc.SQLAlchemyError) as exc:  # serving must not depend on it
            log.warning("impressions hook off: store %s unavailable: %s", url, exc)
            return cls(None, imp.Versions())
        return cls(store, _registry_versions(config, root))

    def log(self, model_input: Any, out: pd.DataFrame, fb: RequestFeedback) -> None:
        if self.store is None or out.empty:
            return
        answered = out[out["rank"].notna()] if "rank" in out.columns else out.iloc[0:0]
        if answered.empty:
            return
        n = int(pd.to_numeric(out["query"]).max()) + 1
        ids = _query_ids(model_input, n)
        cols = ("rank", schema.IMAGE_ID, schema.ITEM_ID, "score", "similarity")
        records = []
        for row, hits in answered.groupby("query", sort=True):
            digest, text, lang = ids[int(row)]
            records.append(
                imp.Impression(
                    query_sha256=digest,
                    results=hits[[c for c in cols if c in hits.columns]],
                    versions=self.versions,
                    session=fb.session,
                    source=imp.SOURCE_MODEL,
                    query_text=text,
                    query_lang=lang,
                )
            )
        imp.record_quietly(self.store, records)
