"""Index: build the FAISS index of the served catalog, measure it, and tune the ranking on val.

Inputs: ``--extract-run-id`` (its ``embeddings.parquet`` from ``imgsearch.embed.files.save_embeddings``:
one file, or a folder of shards from the Spark engine, either read one shard at a time by
``imgsearch.search.shards.build_index_from_shards``; and its ``extractor_fingerprint`` param, else the same key in the embeddings file's metadata),
the manifest (``manifest.parquet`` of ``--manifest-run-id``, else of ``--split-run-id``, else of
the extract run or the run it names in an ``imgsearch.input.*_run_id`` tag), ``configs/index.yaml``
(``--factory`` overrides ``index.factory``) and ``configs/ranking.yaml``.
The gallery is every embedded image (the served catalog); its metadata is its manifest rows.

Produces: artifact ``index/`` (``index.faiss``, ``meta.parquet``, ``index.json`` with sha256 and
the extractor fingerprint; load with ``imgsearch.search.index.ImageIndex.load``), metrics ``build_s``,
``recall_at_10_vs_exact``, ``latency_ms_p50/p95``, ``qps_batch1``, ``qps_batch1000``, ``count``,
``nprobe``/``ef_search``; tag ``index.factory``; ``ranking.yaml`` (the ranking config to serve).
With ``--split-run-id`` the ranking is tuned (``imgsearch.search.tuning.tune``) on the ``val`` images
against the val gallery: ``ranking_tune.parquet`` (one row per grid point) and metrics
``val_map``, ``val_hit_at_1``, ``ranking_popularity_weight``, ``ranking_mmr_lambda``.

Add mode (``--add-to-index-run-id``): instead of building, load that run's ``index/`` (its sha256
verified, bound to the same extractor fingerprint), add the embeddings of the extract run that are
not in it yet (their metadata from the manifest as above), and publish the result the same way
(``ImageIndex.save``: checksummed, atomic). Metrics ``count``, ``count_before``, ``n_added``; tags
``imgsearch.index.mode=add`` and ``imgsearch.input.base_index_run_id``; the ranking is not re-tuned:
the base run's ``ranking.yaml`` is served as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException

from imgsearch import schema
from imgsearch.config import from_dict
from imgsearch.embed.files import embeddings_metadata, load_embeddings
from imgsearch.search.factory import IndexConfig
from imgsearch.search.index import ImageIndex, gallery_meta
from imgsearch.search.ranking import RankingConfig
from imgsearch.search.shards import build_index_from_shards, select_embeddings
from imgsearch.search.tuning import tune_on_split
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

log = logging.getLogger(__name__)

INDEX_ARTIFACT = "index"
RANKING_ARTIFACT = "ranking.yaml"
MANIFEST_ARTIFACT = "manifest.parquet"
FINGERPRINT_KEY = "extractor_fingerprint"


def _fingerprint(extract_run_id: str, embeddings_file: Path) -> str:
    run = mlflow.get_run(extract_run_id)
    value = run.data.params.get(FINGERPRINT_KEY) or run.data.tags.get(FINGERPRINT_KEY)
    value = value or embeddings_metadata(embeddings_file).get(FINGERPRINT_KEY)
    if not value:
        raise ValueError(
            f"extract run {extract_run_id} records no {FINGERPRINT_KEY!r} (param, tag or embeddings "
            "metadata): an index must be bound to the extractor that made its vectors"
        )
    return str(value)


def _manifest(
    extract_run_id: str, split_run_id: str | None, manifest_run_id: str | None
) -> pd.DataFrame:
    candidates = [r for r in (manifest_run_id, split_run_id, extract_run_id) if r]
    tags = mlflow.get_run(extract_run_id).data.tags
    candidates += [v for k, v in sorted(tags.items()) if k.startswith("imgsearch.input.") and v]
    for run_id in candidates:
        try:
            return read_df(run_id, MANIFEST_ARTIFACT)
        except (MlflowException, OSError):
            continue
    raise ValueError(f"no {MANIFEST_ARTIFACT} in runs {candidates}; pass --manifest-run-id")


def run(
    extract_run_id: str,
    split_run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    manifest_run_id: str | None = None,
    embeddings_artifact: str = EMBEDDINGS_ARTIFACT,
    tune_max_queries: int = 2000,
    add_to_index_run_id: str | None = None,
) -> str:
    with stage_run("index", overrides, profile) as (active, all_cfg):
        inputs = {
            "extract_run_id": extract_run_id,
            "split_run_id": split_run_id,
            "base_index_run_id": add_to_index_run_id,
        }
        mlflow.set_tags({f"imgsearch.input.{k}": v for k, v in inputs.items() if v})
        cfg = from_dict(IndexConfig, all_cfg.get("index"))
        ranking_cfg = from_dict(RankingConfig, all_cfg.get("ranking"))
        emb_file = artifact_path(extract_run_id, embeddings_artifact)
        fingerprint = _fingerprint(extract_run_id, emb_file)
        manifest = _manifest(extract_run_id, split_run_id, manifest_run_id)
        if add_to_index_run_id:
            ids, emb = load_embeddings(emb_file)
            _add_to_index(add_to_index_run_id, ids, emb, manifest, fingerprint)
            return active.info.run_id

        # one shard in memory at a time (a single file is one shard): train on a sample, add
        # shard by shard, exact neighbours merged across shards
        index, metrics = build_index_from_shards(emb_file, manifest, cfg, fingerprint)
        meta = index.meta
        metrics["n_manifest_not_embedded"] = int(len(manifest) - len(meta))
        mlflow.set_tag("index.factory", index.factory)
        log_metrics(metrics)
        _publish(index)

        if split_run_id:
            # the ranking is tuned on the val images only: load just their vectors
            val = meta[meta[schema.SPLIT] == "val"] if schema.SPLIT in meta.columns else meta[:0]
            val_ids, val_emb = select_embeddings(emb_file, set(val[schema.IMAGE_ID].astype(str)))
            ranking_cfg, table = tune_on_split(
                val_emb,
                gallery_meta(val_ids, manifest),
                ranking_cfg,
                fingerprint,
                "val",
                tune_max_queries,
                cfg.seed,
            )
            best = table[table["best"]].iloc[0]
            log_df(table, "ranking_tune.parquet")
            log_metrics(
                {
                    "val_map": best["map"],
                    "val_hit_at_1": best["hit_at_1"],
                    "val_n_queries": best["n_queries"],
                    "ranking_popularity_weight": ranking_cfg.popularity_weight,
                    "ranking_mmr_lambda": ranking_cfg.mmr_lambda,
                }
            )
        mlflow.log_text(
            yaml.safe_dump(dataclasses.asdict(ranking_cfg), sort_keys=True), RANKING_ARTIFACT
        )
        return active.info.run_id


def _add_to_index(
    base_run_id: str, ids: np.ndarray, emb: np.ndarray, manifest: pd.DataFrame, fingerprint: str
) -> None:
    """Add the vectors not yet in ``base_run_id``'s index to it; publish it and its ranking."""
    mlflow.set_tag("imgsearch.index.mode", "add")
    # load verifies the sha256 and refuses an index made by another extractor
    index = ImageIndex.load(
        artifact_path(base_run_id, INDEX_ARTIFACT), expected_extractor_fingerprint=fingerprint
    )
    in_index = set(index.meta[schema.IMAGE_ID].astype(str))
    pick = np.array([str(i) not in in_index for i in ids], dtype=bool)
    n_before = index.count
    index.add(emb[pick], gallery_meta(ids[pick], manifest))
    log_metrics({"count": index.count, "n_added": int(pick.sum()), "count_before": n_before})
    mlflow.set_tag("index.factory", index.factory)
    _publish(index)
    mlflow.log_artifact(str(artifact_path(base_run_id, RANKING_ARTIFACT)))


def _publish(index: ImageIndex) -> None:
    """``ImageIndex.save`` writes the files and their checksums; the run holds them as ``index/``."""
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifacts(str(index.save(Path(tmp) / INDEX_ARTIFACT)), INDEX_ARTIFACT)


OPTIONS = (
    Option("--extract-run-id", f"run holding {EMBEDDINGS_ARTIFACT}", required=True),
    Option("--split-run-id", "run holding manifest.parquet with split: tunes ranking"),
    Option("--manifest-run-id", "run holding manifest.parquet (default: see above)"),
    Option("--factory", "FAISS factory string or auto (default: config)", key="index.factory"),
    Option(
        "--embeddings-artifact",
        "artifact name in the extract run",
        default=EMBEDDINGS_ARTIFACT,
        empty_is_none=False,
    ),
    Option("--tune-max-queries", "val queries for tuning", default=2000, type=int),
    Option("--add-to-index-run-id", "add the new vectors to this run's index instead of building"),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
