"""The scheduled improve job (first part): drift check on new data, then a logged decision.

Inputs: ``reference_run_id`` and ``current_run_id``, extract runs holding ``embeddings.parquet``
(the reference: the champion's training data; the current: the new data, embedded with the
champion's extractor). Produces an MLflow run tagged ``imgsearch.stage=improve`` with tags
``imgsearch.improve.decision`` (``improve`` | ``wait`` | ``skip``) and ``imgsearch.improve.reason``,
and the drift stage as a nested run.

Decision: ``improve`` when drift is detected or at least ``min_new_images`` new images arrived;
``wait`` otherwise; ``skip`` without new data.

Not done yet (a later session): validating and embedding the new data here (today the caller
passes an extract run of it), and acting on ``improve`` (incremental fine-tuning, re-indexing,
evaluation, gated promotion). The decision is recorded only; nothing is trained or promoted.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow

from monitoring import drift as drift_stage
from monitoring.daemon import IMPROVE_STAGE, stop_requested

log = logging.getLogger(__name__)


def decide(drift_detected: bool, n_new: int, min_new_images: int) -> tuple[str, str]:
    """``(decision, reason)`` from the drift verdict and the amount of new data."""
    if n_new <= 0:
        return "skip", "no new data"
    if drift_detected:
        return "improve", "drift detected"
    if n_new >= min_new_images:
        return "improve", f"{n_new} new images >= {min_new_images}"
    return "wait", f"no drift and {n_new} new images < {min_new_images}"


def run(
    reference_run_id: str | None = None,
    current_run_id: str | None = None,
    min_new_images: int = 500,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
) -> str:
    with mlflow.start_run(run_name=IMPROVE_STAGE) as active:
        mlflow.set_tag("imgsearch.stage", IMPROVE_STAGE)
        mlflow.log_param("min_new_images", min_new_images)
        if not reference_run_id or not current_run_id:
            decision, reason = decide(False, 0, min_new_images)
        else:
            mlflow.set_tags(
                {
                    "imgsearch.input.reference_run_id": reference_run_id,
                    "imgsearch.input.current_run_id": current_run_id,
                }
            )
            drift_id = drift_stage.run(reference_run_id, current_run_id, overrides, profile)
            mlflow.set_tag("imgsearch.run.drift", drift_id)
            metrics = mlflow.get_run(drift_id).data.metrics
            n_new = int(metrics.get("n_current", 0))
            decision, reason = decide(
                bool(metrics.get("drift_detected", 0.0)), n_new, min_new_images
            )
            mlflow.log_metrics({"n_new": n_new, "drift_detected": metrics.get("drift_detected", 0)})
        if stop_requested():
            reason += " (daemon stopping)"
        mlflow.set_tags(
            {"imgsearch.improve.decision": decision, "imgsearch.improve.reason": reason}
        )
        log.info("improve decision: %s (%s); fine-tuning is not implemented yet", decision, reason)
        return active.info.run_id
