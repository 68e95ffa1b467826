"""rerank: learn a reranker from feedback (or simulated users), measure it, register and gate it.

Inputs (``configs/rerank.yaml``; options override): the index version whose candidates are
reranked (``--index-version``, default ``imgsearch-index@champion``), and the sessions to learn
from (``--source``):

* ``store``: the impressions and votes of that index version in the feedback store
  (``IMGSEARCH_FEEDBACK_URL`` or ``--feedback-url``; :mod:`registry.impressions`); the held-out
  sessions are the latest ``test_share`` of the queries (a time split, never trained on), and
  their up votes are the relevance;
* ``simulate``: simulated users (:mod:`imgsearch.search.click_sim`: a hidden preference,
  position-biased examination, noise) on the index's own catalog, or on a synthetic catalog
  with ``--catalog synthetic`` (measured only, nothing registered: it belongs to no index).
  Train sessions query the train items, held-out sessions the others.

Produces: ``comparison.csv`` (and ``comparison.parquet``) and metrics ``<ranking>.ndcg_at_10`` /
``<ranking>.map_at_r`` of the first stage, logistic, LambdaRank with and without position debiasing, Rocchio (simulation: the
held-out list re-ordered by its own votes) and the ideal ranking on the held-out queries; the configured ranking registered as ``imgsearch-reranker`` (challenger),
tagged with its index and extractor versions and checksums, and promoted to ``champion`` only
when it beats the first stage on the held-out NDCG@10 (tags ``rerank.promoted`` / ``.reason``).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from imgsearch import schema
from imgsearch.config import from_dict
from imgsearch.errors import ConfigError
from imgsearch.search import click_sim
from imgsearch.search.ranking import popularity
from imgsearch.search.rerank_eval import compare
from registry import reranker_model as rr
from registry.feedback import FeedbackStore
from registry.impressions import ImpressionStore, labelled
from registry.integrity import load_verified
from registry.tags import CHAMPION, INDEX_MODEL
from steps.common import Option, cli, log_df, log_metrics, stage_run

log = logging.getLogger(__name__)


@dataclass
class RerankStepConfig:
    source: str = "simulate"  # simulate | store
    catalog: str = "index"  # simulate on: index | synthetic
    index_name: str = INDEX_MODEL
    index_version: str = ""  # '' = the champion's
    ranking: str = "lambdarank_debiased"  # the one registered and gated
    test_share: float = 0.3
    sessions_per_query: int = 2
    shown: int = 20
    seed: int = 0
    min_delta: float = 1e-4
    min_queries: int = 20
    feedback_url: str = ""
    synthetic_images: int = 1500
    retrain_min_new_votes: int = 200  # the daemon retrains when this many new votes arrived

    def __post_init__(self) -> None:
        if self.source not in ("simulate", "store") or self.catalog not in ("index", "synthetic"):
            raise ConfigError("rerank: source is simulate|store, catalog is index|synthetic")
        if not 0.0 < float(self.test_share) < 1.0:
            raise ConfigError(f"rerank.test_share must be in (0, 1), got {self.test_share}")


def _index(cfg: RerankStepConfig, client: MlflowClient) -> tuple[str, Any]:
    """(version, ImageIndex) of the index the reranker is for, loaded with its checksums."""
    version = cfg.index_version or str(
        client.get_model_version_by_alias(cfg.index_name, CHAMPION).version
    )
    model = load_verified(f"models:/{cfg.index_name}/{version}", client=client)
    return str(version), model.unwrap_python_model().index


def simulated_sessions(
    vectors: np.ndarray, meta: pd.DataFrame, cfg: RerankStepConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and held-out sessions of simulated users (disjoint query items)."""
    test_q = click_sim.query_split(meta, cfg.test_share)
    rows = np.arange(len(meta))
    train = click_sim.simulate(
        vectors, meta, rows[~test_q], shown=cfg.shown,
        sessions_per_query=cfg.sessions_per_query, seed=cfg.seed + 1,
    )  # fmt: skip
    test = click_sim.simulate(vectors, meta, rows[test_q], shown=cfg.shown, seed=cfg.seed + 2)
    return train, test


def stored_sessions(
    meta: pd.DataFrame, index_version: str, cfg: RerankStepConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Impressions of ``index_version`` joined with their votes and the index metadata, split
    by time: the latest ``test_share`` of the queries are held out."""
    url = cfg.feedback_url or None
    shown = ImpressionStore(url).impressions()
    shown = shown[shown["index_version"] == str(index_version)]
    data = labelled(shown, FeedbackStore(url).votes())
    if data["query_id"].nunique() < cfg.min_queries:
        raise ConfigError(
            f"only {data['query_id'].nunique()} queries with impressions for index "
            f"v{index_version} (need {cfg.min_queries}): collect more feedback first"
        )
    ids = meta[schema.IMAGE_ID].astype(str)
    pop = pd.Series(popularity(meta), index=ids)
    cat = (
        pd.Series(meta[schema.CATEGORY].astype(str).to_numpy(), index=ids)
        if schema.CATEGORY in meta.columns
        else pd.Series(dtype=str)
    )
    data["popularity"] = data["result_image_id"].map(pop).fillna(0.0)
    data[schema.CATEGORY] = data["result_image_id"].map(cat)
    data["query_category"] = data["query_image_id"].map(cat)
    order = data.groupby("query_id")["created_at"].min().sort_values(kind="stable")
    cut = int(round(len(order) * (1 - cfg.test_share)))
    held_out = set(order.index[cut:])
    test = data[data["query_id"].isin(held_out)]
    return data[~data["query_id"].isin(held_out)], test


def run(overrides: dict[str, Any] | None = None, profile: str | None = None) -> str:
    with stage_run("rerank", overrides, profile) as (active, all_cfg):
        cfg = from_dict(RerankStepConfig, all_cfg.get("rerank"))
        client = MlflowClient()
        index_version, vectors = None, None
        if cfg.source == "simulate" and cfg.catalog == "synthetic":
            vectors, meta = click_sim.synthetic_catalog(cfg.synthetic_images, seed=cfg.seed)
            train, test = simulated_sessions(vectors, meta, cfg)
        else:
            index_version, index = _index(cfg, client)
            meta = index.meta
            if cfg.source == "simulate":
                vectors = index.vectors(np.arange(index.count))
                train, test = simulated_sessions(vectors, meta, cfg)
            else:
                train, test = stored_sessions(meta, index_version, cfg)
        ids = pd.Index(meta[schema.IMAGE_ID].astype(str))
        table, models = compare(train, test, vectors=vectors, ids=ids)
        if cfg.ranking not in models:
            raise ConfigError(f"rerank.ranking {cfg.ranking!r} is not one of {sorted(models)}")
        # Parquet plus a real CSV beside it (comparison.csv), which the MLflow UI shows
        log_df(table.reset_index(), "comparison.parquet", view=True)
        log_metrics(
            {
                **rr.comparison_metrics(table),
                "train_queries": float(train["query_id"].nunique()),
                "test_queries": float(test["query_id"].nunique()),
            }
        )
        decision = rr.gate(table, cfg.ranking, cfg.min_delta)
        mlflow.set_tags({"rerank.reason": decision.reason[:5000], "rerank.ranking": cfg.ranking})
        if index_version is None:
            mlflow.set_tag("rerank.promoted", "false")
            log.info("synthetic catalog: measured only, nothing registered\n%s", table)
            print(report(table, active.info.run_id, "measured only, nothing registered"))
            return active.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            saved = models[cfg.ranking].save(Path(tmp) / rr.ARTIFACT_RERANKER)
            version = rr.log_reranker_model(
                saved,
                index_version=index_version,
                table=table,
                chosen=cfg.ranking,
                train_ids=sorted(map(str, train["query_id"].unique())),
                kind=cfg.ranking,
                client=client,
                index_name=cfg.index_name,
            )
        promoted = rr.apply_gate(client, version, decision)
        mlflow.set_tags(
            {"rerank.promoted": str(promoted).lower(), "rerank.version": str(version.version)}
        )
        verdict = "champion" if promoted else "registered as challenger, not promoted"
        outcome = (
            f"{rr.RERANKER_MODEL} v{version.version} for {cfg.index_name} v{index_version}: "
            f"{verdict} ({decision.reason})"
        )
        print(report(table, active.info.run_id, outcome))
        return active.info.run_id


def report(table: pd.DataFrame, run_id: str, outcome: str) -> str:
    """What ``make rerank`` prints: the held-out comparison, where it is, what became champion."""
    shown = table[[c for c in ("ndcg_at_10", "map_at_r") if c in table.columns]].copy()
    if "n_queries" in table.columns:
        shown["n_queries"] = table["n_queries"].astype(int)
    uri = mlflow.get_run(run_id).info.artifact_uri.rstrip("/")
    return "\n".join(
        [
            "==> rerank: held-out queries (simulated users or the latest stored ones)",
            shown.to_string(float_format=lambda x: f"{x:.4f}"),
            f"comparison table: {uri}/comparison.csv (run {run_id})",
            outcome,
        ]
    )


OPTIONS = (
    Option("--source", "simulate | store", key="rerank.source"),
    Option("--catalog", "with simulate: index | synthetic", key="rerank.catalog"),
    Option("--index-version", "index version (default: champion)", key="rerank.index_version"),
    Option("--ranking", "the ranking registered and gated", key="rerank.ranking"),
    Option("--feedback-url", "feedback store URL (store source)", key="rerank.feedback_url"),
    Option("--seed", "simulation seed", key="rerank.seed"),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
