"""Categorize: an extract run's images sorted into named clusters, with keywords and a gallery.

Inputs: ``--extract-run-id`` (its ``embeddings.parquet`` and ``manifest.parquet``: paths for the
gallery, and ``category``/``subcategory``/``split`` where they exist, used only to measure),
optionally ``--keywords-run-id`` (an align run: ``keywords.parquet``, zero-shot keywords of every
image, the keyword source when labels are hidden), optionally ``--texts-run-id`` (the ingest run:
``texts.parquet``; the true tags for keyword precision@k, and with ``member_texts: true`` and
no ``--keywords-run-id`` the members' own tags as the keyword source), and
``configs/categorize.yaml`` (``--k``, ``--n-categories``, ``--label-column`` override it). The
library is :mod:`imgsearch.categorize.collection`. Not part of ``main``'s chain: run it on any
extract run.

Produces: ``categories.parquet`` + ``categories.csv`` (the two-level tree: name and its source,
keywords, size, cohesion, purity), ``assignments.parquet`` + ``assignments.csv`` (image ->
cluster, category, distance, confidence, outlier, name, keywords), ``gallery/categories.html``
(self-contained), metrics: ``n_clusters``, ``n_categories``, ``{cluster,category}_{subcategory,category}_
{nmi,ari,purity}`` (and ``test_...``), ``cluster_keywords_<lang>_precision_at_<k>`` (on test
images when a split exists), ``seconds``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from imgsearch import schema
from imgsearch.categorize.collection import CategorizeConfig, CategorizeResult, categorize
from imgsearch.categorize.gallery import gallery_html
from imgsearch.categorize.keywords import precision_at_k, vocabulary
from imgsearch.data.texts import TAG_KIND
from imgsearch.embed.files import load_embeddings
from steps.align import KEYWORDS_ARTIFACT
from steps.common import (
    EMBEDDINGS_ARTIFACT,
    Option,
    artifact_path,
    cli,
    log_df,
    log_metrics,
    read_df,
    stage_run,
)
from steps.ingest import TEXTS_ARTIFACT

log = logging.getLogger(__name__)

STEP_KEYS = ("member_texts", "keywords_per_image", "gallery", "in_main")


def _images(extract_run_id: str, ids: Sequence[str] | np.ndarray) -> pd.DataFrame:
    """The extract run's manifest rows in embedding order (only ``image_id`` when it has none)."""
    order = pd.DataFrame({schema.IMAGE_ID: [str(i) for i in ids]})
    try:
        manifest = read_df(extract_run_id, "manifest.parquet")
    except (MlflowException, OSError):
        log.warning("extract run %s has no manifest.parquet: no paths, no truth", extract_run_id)
        return order
    manifest = manifest.astype({schema.IMAGE_ID: str}).drop_duplicates(schema.IMAGE_ID)
    return order.merge(manifest, on=schema.IMAGE_ID, how="left", validate="one_to_one")


def _docs_from_keywords(keywords: pd.DataFrame, ids: Sequence[str], top: int) -> dict:
    """Language -> the top-``top`` zero-shot keywords of each image, in embedding order."""
    kept = keywords[keywords["rank"] <= top].sort_values([schema.IMAGE_ID, "rank"])
    out = {}
    for lang, rows in kept.groupby("lang", sort=True):
        words = rows.groupby(schema.IMAGE_ID)["keyword"].agg(list)
        out[str(lang)] = [words.get(str(i), []) for i in ids]
    return out


def _docs_from_texts(texts: pd.DataFrame, images: pd.DataFrame) -> dict:
    """Language -> the tags of each image's item, in embedding order."""
    if schema.ITEM_ID not in images.columns:
        return {}
    tags = texts[texts["kind"] == TAG_KIND]
    out = {}
    for lang, rows in tags.groupby("lang", sort=True):
        words = rows.groupby(schema.ITEM_ID)["text"].agg(list)
        out[str(lang)] = [words.get(str(i), []) for i in images[schema.ITEM_ID]]
    return out


def keyword_precision(
    result: CategorizeResult, images: pd.DataFrame, texts: pd.DataFrame, k: int
) -> dict[str, float]:
    """Precision@k of each image's cluster keywords against its item's true tags (test images
    when a split exists), by :func:`imgsearch.categorize.keywords.precision_at_k`."""
    if schema.ITEM_ID not in images.columns:
        return {}
    scope = images
    if schema.SPLIT in images.columns and (images[schema.SPLIT] == "test").any():
        scope = images[images[schema.SPLIT] == "test"]
    fine = result.categories[result.categories["level"] == "cluster"].set_index("cluster_id")
    cluster_of = result.assignments.set_index(schema.IMAGE_ID)["cluster_id"]
    rows = []
    for column in [c for c in fine.columns if c.startswith("keywords_")]:
        lang = column.removeprefix("keywords_")
        for image_id in scope[schema.IMAGE_ID]:
            words = [w for w in str(fine.at[cluster_of[image_id], column]).split(";") if w]
            rows += [(image_id, lang, r + 1, w) for r, w in enumerate(words)]
    if not rows:
        return {}
    kw = pd.DataFrame(rows, columns=[schema.IMAGE_ID, "lang", "rank", "keyword"])
    found = precision_at_k(kw, scope, texts, vocabulary(texts, min_items=1), k=k)
    return {f"cluster_{name}": value for name, value in found.items()}


def _log_tables(result: CategorizeResult, html: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name, table in (("categories", result.categories), ("assignments", result.assignments)):
            log_df(table, f"{name}.parquet")
            table.to_csv(out / f"{name}.csv", index=False, float_format="%.4f")
            mlflow.log_artifact(str(out / f"{name}.csv"))
        (out / "gallery").mkdir()
        (out / "gallery" / "categories.html").write_text(html, encoding="utf-8")
        mlflow.log_artifacts(str(out / "gallery"), "gallery")


def run(
    extract_run_id: str,
    keywords_run_id: str | None = None,
    texts_run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
) -> str:
    with stage_run("categorize", overrides, profile) as (active, all_cfg):
        mlflow.set_tags(
            {
                "imgsearch.input.extract_run_id": extract_run_id,
                "imgsearch.input.keywords_run_id": keywords_run_id or "",
                "imgsearch.input.texts_run_id": texts_run_id or "",
            }
        )
        section = dict(all_cfg.get("categorize") or {})
        step = {key: section.pop(key, None) for key in STEP_KEYS}
        cfg = CategorizeConfig.from_mapping(section)
        start = time.perf_counter()
        ids, emb = load_embeddings(artifact_path(extract_run_id, EMBEDDINGS_ARTIFACT))
        images = _images(extract_run_id, ids)
        texts = read_df(texts_run_id, TEXTS_ARTIFACT) if texts_run_id else None
        docs: dict = {}
        if keywords_run_id:
            docs = _docs_from_keywords(
                read_df(keywords_run_id, KEYWORDS_ARTIFACT),
                [str(i) for i in ids],
                int(step["keywords_per_image"] or 5),
            )
        elif texts is not None and step["member_texts"]:
            docs = _docs_from_texts(texts, images)
        mlflow.set_tag("imgsearch.categorize.keyword_source", ",".join(docs) or "none")
        result = categorize(ids, emb, images, docs, cfg)
        metrics = dict(result.metrics)
        if texts is not None and docs:
            metrics.update(keyword_precision(result, images, texts, cfg.keywords_top))
        metrics["seconds"] = time.perf_counter() - start
        log_metrics(metrics)
        gallery = dict(step["gallery"] or {})
        paths = dict(
            zip(
                images[schema.IMAGE_ID],
                images.get(schema.PATH, pd.Series([None] * len(images))),
                strict=True,
            )
        )
        html = gallery_html(
            result.categories,
            {i: str(p) for i, p in paths.items() if isinstance(p, str) and p},
            thumbs_per_cluster=int(gallery.get("thumbs_per_cluster", 8)),
            thumb_px=int(gallery.get("thumb_px", 48)),
            title=f"categories of extract run {extract_run_id}",
        )
        _log_tables(result, html)
        log.info(
            "categorize: k=%d, %d categories; %s",
            len(result.clustering.centroids),
            len(result.clustering.category_centroids),
            {k: round(v, 3) for k, v in metrics.items() if k.endswith(("_nmi", "_ari"))},
        )
        return active.info.run_id


OPTIONS = (
    Option("--extract-run-id", f"run holding {EMBEDDINGS_ARTIFACT}", required=True),
    Option("--keywords-run-id", f"align run holding {KEYWORDS_ARTIFACT} (zero-shot keywords)"),
    Option("--texts-run-id", f"ingest run holding {TEXTS_ARTIFACT} (true tags)"),
    Option("--k", "fine clusters (default: config; null = chosen)", key="categorize.clusters.k"),
    Option("--n-categories", "top-level categories", key="categorize.clusters.n_categories"),
    Option("--label-column", "manifest column naming clusters", key="categorize.label_column"),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
