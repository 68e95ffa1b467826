"""The search page's body: upload an image (or pick one from the catalog), or type words, and
browse what the champion finds. :mod:`app.search_page` (what ``streamlit run`` starts) draws the
title first and imports this module under a spinner, so the first paint does not wait for
PyTorch and MLflow to import.

It loads ``imgsearch-index@champion`` (``configs/search.yaml``) in-process from the tracking store
in ``MLFLOW_TRACKING_URI`` (default ``sqlite:///mlflow.db``), once per process
(``st.cache_resource``), and shows which index and extractor versions answer. Results come as a
grid (thumbnail, item name, the display attributes of ``search.caption_columns`` such as vendor and
category, score, similarity, and popularity only where the catalog has it; see :mod:`app.captions`)
with thumbs up / down per result, stored by :mod:`registry.feedback`; every result list shown is
stored as an impression (:mod:`registry.impressions`), and "Refine" searches again with this
session's votes on the query (Rocchio relevance feedback; the thumbs-down results drop out). With
``search.ab.enabled`` the grid is the online A/B's team-draft interleaved list (seeded by session
and query, so a re-run shows the same list), stored with each result's team. A file
that cannot be used (not an image, a decompression bomb, too large, empty...) gets a clear message
and the page keeps working.

Environment: ``MLFLOW_TRACKING_URI`` (the registry), ``IMGSEARCH_FEEDBACK_URL`` (the feedback
store, any SQLAlchemy URL), ``IMGSEARCH_PROFILE`` (a ``configs/profiles/NAME.yaml`` overlay).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import mlflow
import pandas as pd
import streamlit as st
from mlflow.exceptions import MlflowException

from app.captions import caption, has_popularity
from app.session_feedback import (
    feedback_params,
    record_impression,
    refine_button,
    session_votes,
)
from imgsearch import schema
from imgsearch.errors import ImageRejected, ImgsearchError
from imgsearch.search.interleave import ABConfig
from registry.feedback import (
    DOWN,
    UP,
    FeedbackStore,
    Vote,
    feedback_url,
    query_sha256,
    text_query_sha256,
)
from registry.search import (
    SearchConfig,
    Served,
    load_search_config,
    load_served,
    preview,
    read_query,
    search,
    search_text,
    served_versions,
)
from registry.served_attributes import attribute_summary, predict_attributes

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
UPLOAD, CATALOG = "Upload an image", "Pick from the catalog"


@st.cache_resource(show_spinner="Loading the served model...", max_entries=2)
def served_model(
    index_name: str,
    versions: tuple[str, ...],
    alias: str,
    extractor_name: str,
    allow_paths: bool,
    tracking_uri: str,
    use_reranker: bool = True,
    ab_challenger: str | None = None,
) -> Served:
    """One loaded model per process; a promotion (an alias of the index, the reranker, the A/B
    challenger or the attribute heads moves: ``versions`` is :func:`served_versions`) loads the
    new one. ``ab_challenger``: the A/B's challenger alias when the A/B is on (None: off)."""
    cfg = SearchConfig(
        index_name=index_name,
        alias=alias,
        extractor_name=extractor_name,
        allow_paths=allow_paths,
        use_reranker=use_reranker,
        ab=ABConfig(enabled=ab_challenger is not None, challenger=ab_challenger or "challenger"),
    )
    return load_served(cfg, version=versions[0])


@st.cache_resource
def feedback_store(url: str) -> FeedbackStore:
    return FeedbackStore(url)


def _tracking_uri() -> str:
    # MLflow's own default is ./mlruns; the project keeps its runs in sqlite:///mlflow.db.
    if "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri().startswith("file:"):
        mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
        mlflow.set_registry_uri(DEFAULT_TRACKING_URI)
    return str(mlflow.get_tracking_uri())


def _reject_message(exc: ImageRejected) -> str:
    reasons = {
        "empty_file": "the file is empty",
        "file_too_large": "the file is too large",
        "decompression_bomb": "the image declares more pixels than allowed (decompression bomb)",
        "not_an_image": "the file is not an image",
    }
    what = reasons.get(exc.reason, exc.reason.replace("_", " "))
    detail = f" ({exc.detail})" if exc.detail else ""
    return f"This file cannot be used as a query: {what}{detail}."


def _controls(served: Served, cfg: SearchConfig, catalog: pd.DataFrame) -> dict[str, Any]:
    d = served.param_defaults
    side = st.sidebar
    side.header("Ranking")
    params: dict[str, Any] = {
        "k": int(side.number_input("Results (k)", 1, 100, int(cfg.k), key="k")),
        "popularity_weight": float(
            side.slider(
                "Popularity weight",
                0.0,
                1.0,
                float(d.get("popularity_weight", 0.0) or 0.0),
                0.01,
                key="popularity_weight",
            )
        ),
        "mmr_lambda": float(
            side.slider(
                "Relevance vs diversity (MMR lambda; 1 = relevance only)",
                0.0,
                1.0,
                float(d.get("mmr_lambda", 1.0) if d.get("mmr_lambda") is not None else 1.0),
                0.05,
                key="mmr_lambda",
            )
        ),
        "exclude_nsfw": bool(
            side.checkbox("Hide NSFW", bool(d.get("exclude_nsfw", False)), key="exclude_nsfw")
        ),
        "one_per_item": bool(
            side.checkbox(
                "One image per item", bool(d.get("one_per_item", False)), key="one_per_item"
            )
        ),
    }
    if schema.CATEGORY in catalog.columns:
        options = sorted(str(c) for c in catalog[schema.CATEGORY].dropna().unique())
        chosen = side.multiselect("Categories (none = all)", options, key="category")
        params["category"] = ",".join(chosen)
    return params


def _query(cfg: SearchConfig, catalog: pd.DataFrame) -> tuple[bytes | None, str | None, str | None]:
    """(query bytes, catalog image id or None, label) or (None, None, None) when there is none."""
    has_paths = schema.PATH in catalog.columns and not catalog.empty
    sources = [UPLOAD, CATALOG] if has_paths else [UPLOAD]
    source = st.radio("Query", sources, horizontal=True, key="source")
    if source == UPLOAD:
        upload = st.file_uploader(
            f"An image (JPEG, PNG, GIF, WebP, BMP, TIFF; at most {cfg.max_upload_mb:g} MB)",
            key="upload",
        )
        if upload is None:
            st.info("Upload an image to search with it.")
            return None, None, None
        if upload.size > cfg.max_upload_bytes:
            raise ImageRejected("file_too_large", f"{upload.size} bytes > {cfg.max_upload_bytes}")
        return read_query(upload.getvalue(), cfg.max_upload_bytes), None, upload.name
    text = st.text_input("Filter the catalog by name or id", key="catalog_filter").strip().lower()
    rows = catalog
    if text:
        cols = [c for c in (schema.ITEM_NAME, schema.IMAGE_ID, schema.ITEM_ID) if c in rows]
        hay = rows[cols].astype(str).agg(" ".join, axis=1).str.lower()
        rows = rows[hay.str.contains(text, regex=False)]
    rows = rows.head(cfg.catalog_limit)
    if rows.empty:
        st.info("No catalog image matches the filter.")
        return None, None, None
    labels = {
        str(
            r[schema.IMAGE_ID]
        ): f"{r.get(schema.ITEM_NAME) or r[schema.ITEM_ID]} ({r[schema.IMAGE_ID]})"
        for _, r in rows.iterrows()
    }
    image_id = st.selectbox(
        "Catalog image", list(labels), format_func=lambda i: labels[i], key="catalog_image"
    )
    if image_id is None:
        return None, None, None
    path = rows.loc[rows[schema.IMAGE_ID].astype(str) == image_id, schema.PATH].iloc[0]
    return read_query(str(path), cfg.max_upload_bytes), image_id, labels[image_id]


def _thumbnail(path: Any) -> Any:
    if not isinstance(path, str) or not path:
        return None
    try:
        return preview(read_query(path))
    except (ImageRejected, OSError):
        return None


def _results(
    hits: pd.DataFrame,
    served: Served,
    catalog: pd.DataFrame,
    store: FeedbackStore,
    qsha: str,
    query_image_id: str | None,
    columns: int,
    query_text: str | None = None,
    query_id: str | None = None,
    caption_columns: tuple[str, ...] = (),
) -> None:
    paths = (
        catalog.set_index(catalog[schema.IMAGE_ID].astype(str))[schema.PATH].to_dict()
        if schema.PATH in catalog.columns
        else {}
    )
    popularity = has_popularity(catalog)
    rows = list(hits.itertuples(index=False))
    for start in range(0, len(rows), columns):
        cells = st.columns(columns)
        for cell, row in zip(cells, rows[start : start + columns], strict=False):
            r = row._asdict()
            image_id = str(r[schema.IMAGE_ID])
            with cell:
                thumb = _thumbnail(paths.get(image_id))
                if thumb is not None:
                    st.image(thumb, width="stretch")
                else:
                    st.caption("(no thumbnail)")
                name = r.get(schema.ITEM_NAME) or r.get(schema.ITEM_ID)
                st.markdown(f"**{int(r['rank'])}. {name}**")
                st.caption(caption(r, caption_columns, popularity))
                up, down = st.columns(2)
                key = f"{qsha[:16]}-{int(r['rank'])}-{image_id}"
                for col, vote, label in ((up, UP, "👍"), (down, DOWN, "👎")):
                    if col.button(label, key=f"vote{vote:+d}-{key}"):
                        store.record(
                            Vote(
                                query_sha256=qsha,
                                query_image_id=query_image_id,
                                result_image_id=image_id,
                                result_item_id=str(r.get(schema.ITEM_ID)),
                                rank=int(r["rank"]),
                                score=float(r["score"]) if r.get("score") is not None else None,
                                vote=vote,
                                index_version=served.index_version,
                                extractor_version=served.extractor_version,
                                session=st.session_state["session"],
                                query_text=query_text,
                                query_id=query_id,
                            )
                        )
                        session_votes(qsha)[image_id] = vote
                        st.success("Thanks, feedback recorded.")


def main() -> None:
    """The page below its title (drawn by :mod:`app.search_page`)."""
    st.session_state.setdefault("session", uuid.uuid4().hex)
    cfg = load_search_config(os.environ.get("IMGSEARCH_PROFILE") or None)
    try:
        uri = _tracking_uri()
        served = served_model(
            cfg.index_name,
            served_versions(cfg),
            cfg.alias,
            cfg.extractor_name,
            cfg.allow_paths,
            uri,
            cfg.use_reranker,
            cfg.ab.challenger if cfg.ab.enabled else None,
        )
    except (MlflowException, ImgsearchError, OSError) as exc:
        st.error(
            f"No model to search with: {cfg.index_name}@{cfg.alias} cannot be loaded "
            f"({exc}). Run the pipeline and promote a model first."
        )
        return
    st.caption(f"Answered by {served.label}")
    catalog = served.catalog()
    params = _controls(served, cfg, catalog)
    store = feedback_store(feedback_url(cfg.feedback_url or None))

    words = st.text_input(
        "Search by words (e.g. cat, красная машина)", key="words", max_chars=500
    ).strip()
    if words:
        _text_search(words, served, params, catalog, store, cfg)
        return
    try:
        data, query_image_id, label = _query(cfg, catalog)
    except ImageRejected as exc:
        st.error(_reject_message(exc))
        return
    except OSError as exc:
        st.error(f"The catalog image cannot be read: {exc.strerror or exc}.")
        return
    if data is None:
        return
    left, right = st.columns([1, 4])
    left.image(preview(data), caption=label, width="stretch")
    _predicted_attributes(left, served, data)
    qsha = query_sha256(data)
    params = {**params, **feedback_params(qsha)}
    try:
        hits = search(served, [data], params, ab_key=_ab_key(qsha))
    except MlflowException as exc:
        right.error(f"Search failed: {exc.message}")
        return
    _answer(right, hits, served, catalog, store, cfg, qsha, params, query_image_id=query_image_id)


def _ab_key(qsha: str) -> str:
    """The A/B's coin for this session's query: a page re-run (every click) shows the same
    interleaved list, another session gets its own draw."""
    return f"{st.session_state['session']}:{qsha}"


def _predicted_attributes(where: Any, served: Served, data: bytes) -> None:
    """The query image's predicted attributes under it, or why there are none (a refused model);
    nothing when no attributes model is registered. Never stops the search."""
    found = served.attributes
    if found.model is None:
        if found.version is not None:
            where.caption(found.note)
        return
    try:
        predicted = predict_attributes(found, [data])
    except MlflowException as exc:
        where.caption(f"attributes not predicted: {exc.message}")
        return
    where.caption(f"Predicted: {attribute_summary(predicted, 0)}")


def _text_search(
    words: str,
    served: Served,
    params: dict[str, Any],
    catalog: pd.DataFrame,
    store: FeedbackStore,
    cfg: SearchConfig,
) -> None:
    """Results of a text query; a refused one (a restricted word) says why."""
    qsha = text_query_sha256(words)
    params = {**params, **feedback_params(qsha)}
    try:
        hits = search_text(served, [words], None, params, ab_key=_ab_key(qsha))
    except MlflowException as exc:
        st.error(f"Search refused: {exc.message}")
        return
    _answer(st.container(), hits, served, catalog, store, cfg, qsha, params, words=words)


def _answer(
    where: Any,
    hits: pd.DataFrame,
    served: Served,
    catalog: pd.DataFrame,
    store: FeedbackStore,
    cfg: SearchConfig,
    qsha: str,
    params: dict[str, Any],
    query_image_id: str | None = None,
    words: str | None = None,
) -> None:
    """The answer to an image or a text query in ``where``: the model's error for the query, or
    the result grid (its impression recorded, the Refine button), then the feedback so far."""
    errors = hits["error"].dropna() if "error" in hits.columns else pd.Series([], dtype=object)
    if not errors.empty:
        where.warning(f"No results: {errors.iloc[0]}")
        return
    where.write(f"{len(hits)} results" + (f" for “{words}”" if words else ""))
    query_id = record_impression(hits, served, qsha, query_image_id, words, params, store)
    with where:
        refine_button(qsha)
        _results(
            hits,
            served,
            catalog,
            store,
            qsha,
            query_image_id,
            max(1, int(cfg.grid_columns)),
            query_text=words,
            query_id=query_id,
            caption_columns=tuple(cfg.caption_columns),
        )
    with st.expander("Feedback so far"):
        st.dataframe(store.summary())
