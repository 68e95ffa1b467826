"""The daemon's reranker retraining: retrain ``imgsearch-reranker`` when enough new votes came.

Called once per continuous-improvement run (:func:`monitoring.improve.run`), after the index
part. New votes = votes on the champion index version cast after the newest reranker version
trained for that index version was registered (all of them when there is none). When at least
``rerank.retrain_min_new_votes`` arrived, :func:`steps.rerank.run` trains from the feedback
store (``source=store``) as a nested run; its gate decides about ``champion``. Not enough
feedback is a logged skip, never a failed job.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from imgsearch.config import from_dict, load_config
from imgsearch.errors import ImgsearchError
from registry.feedback import FeedbackStore
from registry.reranker_model import RERANKER_MODEL
from registry.tags import CHAMPION, TAG_INDEX_VERSION
from steps import rerank

log = logging.getLogger(__name__)


def new_votes(client: MlflowClient, store: FeedbackStore, index_version: str) -> int:
    """Votes on ``index_version`` newer than the newest reranker version trained for it."""
    votes = store.votes(index_version=index_version)
    versions: list[ModelVersion]  # a PagedList, or none when the search fails
    try:
        versions = client.search_model_versions(
            f"name = '{RERANKER_MODEL}' and tags.{TAG_INDEX_VERSION} = '{int(index_version)}'"
        )
    except MlflowException:
        versions = []
    if not versions or votes.empty:
        return len(votes)
    newest_ms = max(int(v.creation_timestamp) for v in versions)
    since = datetime.fromtimestamp(newest_ms / 1000, tz=timezone.utc)
    created = pd.to_datetime(votes["created_at"], utc=True)
    return int((created > since).sum())


def maybe_retrain(
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    client: MlflowClient | None = None,
) -> str:
    """Retrain when due; returns what happened (also set as the ``rerank.retrain`` tag of the
    active run): ``retrained <run id>``, ``skipped: ...`` or ``failed: ...``."""
    client = client or MlflowClient()
    cfg = from_dict(rerank.RerankStepConfig, load_config(profile, overrides).get("rerank"))
    try:
        index_version = str(client.get_model_version_by_alias(cfg.index_name, CHAMPION).version)
        store = FeedbackStore(cfg.feedback_url or None)
        fresh = new_votes(client, store, index_version)
        if fresh < cfg.retrain_min_new_votes:
            outcome = f"skipped: {fresh} new votes < {cfg.retrain_min_new_votes}"
        else:
            run_id = rerank.run(
                overrides={
                    **(overrides or {}),
                    "rerank.source": "store",
                    "rerank.index_version": index_version,
                },
                profile=profile,
            )
            outcome = f"retrained {run_id}"
    except (ImgsearchError, MlflowException) as exc:  # e.g. too few queries, no champion
        outcome = f"failed: {type(exc).__name__}: {exc}"
        log.warning("reranker retraining: %s", outcome)
    if mlflow.active_run() is not None:
        mlflow.set_tag("rerank.retrain", outcome[:5000])
    log.info("reranker retraining: %s", outcome)
    return outcome
