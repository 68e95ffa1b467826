"""Index: build the FAISS index of the served catalog, measure it, and tune the ranking on val.

Inputs: ``--extract-run-id`` (its ``embeddings.parquet`` from ``imgsearch.embed.files.save_embeddings``
and its ``extractor_fingerprint`` param, else the same key in the embeddings file's metadata),
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
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException

from imgsearch.config import from_dict
from imgsearch.embed.files import embeddings_metadata, load_embeddings
from imgsearch.search.factory import IndexConfig
from imgsearch.search.index import gallery_meta
from imgsearch.search.measure import build_index
from imgsearch.search.ranking import RankingConfig
from imgsearch.search.tuning import tune_on_split
from steps.common import (
    artifact_path,
    base_parser,
    log_df,
    log_metrics,
    read_df,
    setup_logging,
    stage_run,
)

log = logging.getLogger(__name__)

EMBEDDINGS_ARTIFACT = "embeddings.parquet"
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
) -> str:
    with stage_run("index", overrides, profile) as (active, all_cfg):
        inputs = {"extract_run_id": extract_run_id, "split_run_id": split_run_id}
        mlflow.set_tags({f"imgsearch.input.{k}": v for k, v in inputs.items() if v})
        cfg = from_dict(IndexConfig, all_cfg.get("index"))
        ranking_cfg = from_dict(RankingConfig, all_cfg.get("ranking"))
        emb_file = artifact_path(extract_run_id, embeddings_artifact)
        ids, emb = load_embeddings(emb_file)
        fingerprint = _fingerprint(extract_run_id, emb_file)
        manifest = _manifest(extract_run_id, split_run_id, manifest_run_id)
        meta = gallery_meta(ids, manifest)

        index, metrics = build_index(emb, meta, cfg, fingerprint)
        metrics["n_manifest_not_embedded"] = int(len(manifest) - len(meta))
        mlflow.set_tag("index.factory", index.factory)
        log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifacts(str(index.save(Path(tmp) / "index")), "index")

        if split_run_id:
            ranking_cfg, table = tune_on_split(
                emb, meta, ranking_cfg, fingerprint, "val", tune_max_queries, cfg.seed
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
            yaml.safe_dump(dataclasses.asdict(ranking_cfg), sort_keys=True), "ranking.yaml"
        )
        return active.info.run_id


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--extract-run-id", required=True, help="run holding embeddings.parquet")
    parser.add_argument(
        "--split-run-id", default="", help="run holding manifest.parquet with split: tunes ranking"
    )
    parser.add_argument(
        "--manifest-run-id", default="", help="run holding manifest.parquet (default: see above)"
    )
    parser.add_argument(
        "--factory", default="", help="FAISS factory string or auto (default: config)"
    )
    parser.add_argument(
        "--embeddings-artifact",
        default=EMBEDDINGS_ARTIFACT,
        help="artifact name in the extract run",
    )
    parser.add_argument("--tune-max-queries", type=int, default=2000, help="val queries for tuning")
    args = parser.parse_args()
    setup_logging()
    run_id = run(
        args.extract_run_id,
        args.split_run_id or None,
        overrides={"index.factory": args.factory},
        profile=args.profile or None,
        manifest_run_id=args.manifest_run_id or None,
        embeddings_artifact=args.embeddings_artifact,
        tune_max_queries=args.tune_max_queries,
    )
    print(run_id)


if __name__ == "__main__":
    main()
