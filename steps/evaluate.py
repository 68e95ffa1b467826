"""Evaluate: retrieval metrics and feature quality of an extract run's embeddings on one split.

Inputs: ``--extract-run-id`` (its ``embeddings.parquet``, written by ``imgsearch.embed.files.save_embeddings``),
``--split-run-id`` (its ``manifest.parquet`` with ``split``), ``configs/evaluate.yaml``
(``--split`` and ``--max-queries`` override it). The gallery protocol is in
:mod:`imgsearch.evaluate.retrieval`: each image of the split queries all the other images of the split;
relevant = same item.

Produces: metrics ``hit_at_{k}``, ``precision_at_{k}``, ``recall_at_{k}``, ``map``, ``map_at_r``,
``r_precision``, ``n_queries``..., ``fq_*`` (names are stable: baseline and fine-tuned runs are
compared by them), ``per_category.csv``, ``per_query.parquet`` and, with ``plots: true``,
``plots/embeddings_tsne.png`` and ``plots/embeddings_umap.png``.

With ``evaluate.probe_dir`` set (a folder of real images outside the catalog's domain, one
folder per category, e.g. an icon theme), the extract run's ``extractor`` embeds it and the run
also logs ``probe_map_at_r``, ``probe_precision_at_10``... (:mod:`imgsearch.evaluate.probe`) and
``probe_quarantine.parquet``; ``promote.probe_min_ratio`` can then require them not to fall.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from imgsearch import schema
from imgsearch.config import from_dict
from imgsearch.data.probe import ProbeConfig, probe_catalog
from imgsearch.embed.files import load_embeddings
from imgsearch.evaluate.plots import embedding_plots
from imgsearch.evaluate.probe import probe_scores
from imgsearch.evaluate.report import evaluation_html
from imgsearch.evaluate.retrieval import EvaluateConfig, evaluate
from imgsearch.models.backbones import load_extractor
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
from steps.runs import current_label

log = logging.getLogger(__name__)

EXTRACTOR_ARTIFACT = "extractor"  # what the extract step logs (registry: extractor_artifact)


def run(
    extract_run_id: str,
    split_run_id: str,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    embeddings_artifact: str = EMBEDDINGS_ARTIFACT,
) -> str:
    with stage_run("evaluate", overrides, profile) as (active, all_cfg):
        mlflow.set_tags(
            {
                "imgsearch.input.extract_run_id": extract_run_id,
                "imgsearch.input.split_run_id": split_run_id,
            }
        )
        cfg = from_dict(EvaluateConfig, all_cfg.get("evaluate"))
        ids, emb = load_embeddings(artifact_path(extract_run_id, embeddings_artifact))
        manifest = read_df(split_run_id, "manifest.parquet")
        result = evaluate(ids, emb, manifest, cfg)
        log_metrics(result.metrics)
        log_df(result.per_query, "per_query.parquet", view=True)
        if cfg.probe_dir:
            _probe(extract_run_id, cfg)
        title = f"{current_label() or 'evaluate'} (run {active.info.run_id[:8]})"
        if cfg.report:
            mlflow.log_text(_report(result, manifest, cfg, title), "report.html")
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "per_category.csv"
            result.per_category.to_csv(csv, index=False)
            mlflow.log_artifact(str(csv))
            if cfg.plots:
                rows = (
                    result.per_query
                )  # the queries, i.e. the split's embedded images (or a sample)
                lookup = {image_id: i for i, image_id in enumerate(ids)}
                positions = [lookup[str(i)] for i in rows[schema.IMAGE_ID]]
                categories = (
                    rows[cfg.category_column] if cfg.category_column in rows.columns else None
                )
                plot_dir = Path(tmp) / "plots"
                embedding_plots(
                    emb[positions],
                    categories,
                    plot_dir,
                    max_points=cfg.plot_max_points,
                    seed=cfg.seed,
                    methods=cfg.plot_methods,
                    title=title,
                )
                mlflow.log_artifacts(str(plot_dir), "plots")
        return active.info.run_id


def _probe(extract_run_id: str, cfg: EvaluateConfig) -> None:
    """The out-of-domain probe embedded with the extract run's extractor; its figures logged."""
    assert cfg.probe_dir is not None
    probe = probe_catalog(
        Path(cfg.probe_dir),
        ProbeConfig(min_per_category=cfg.probe_min_per_category, exclude=cfg.probe_exclude),
    )
    extractor = load_extractor(artifact_path(extract_run_id, EXTRACTOR_ARTIFACT))
    metrics, quarantine = probe_scores(extractor, probe, cfg.ks)
    log_metrics(metrics)
    log_df(quarantine, "probe_quarantine.parquet", view=True)


def _report(result: Any, manifest: pd.DataFrame, cfg: EvaluateConfig, title: str) -> str:
    """``report.html``: the figures, example and worst queries as thumbnails, per category."""
    image_ids = manifest[schema.IMAGE_ID].astype(str)
    paths = (
        dict(zip(image_ids, manifest[schema.PATH].astype(str), strict=True))
        if schema.PATH in manifest.columns
        else {}
    )
    items_of = dict(zip(image_ids, manifest[schema.ITEM_ID].astype(str), strict=True))
    return evaluation_html(
        result.metrics,
        result.per_query,
        result.per_category,
        paths,
        items_of,
        f"Evaluation on the {cfg.split} split: {title}",
        seed=cfg.seed,
        category_column=cfg.category_column,
    )


OPTIONS = (
    Option("--extract-run-id", f"run holding {EMBEDDINGS_ARTIFACT}", required=True),
    Option("--split-run-id", "run holding manifest.parquet with split", required=True),
    Option("--split", "train | val | test | all (default: config)", key="evaluate.split"),
    Option(
        "--max-queries", "sample this many queries (default: config)", key="evaluate.max_queries"
    ),
    Option(
        "--embeddings-artifact",
        "artifact name in the extract run",
        default=EMBEDDINGS_ARTIFACT,
        empty_is_none=False,
    ),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
