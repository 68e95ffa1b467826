"""Runs orphaned by a killed job: marked KILLED with a reason, never left RUNNING forever.

A job killed with SIGKILL (or a power cut) cannot end its MLflow runs. Whoever next holds the
job lock (:mod:`monitoring.lock`) knows no job is live on this store, so every ``improve`` run
still RUNNING, and every RUNNING run nested under one, is an orphan: it is terminated as KILLED
and tagged ``imgsearch.improve.decision=killed`` with ``imgsearch.improve.killed_reason``, so
``daemon status`` says what happened instead of ``decision=?``.
"""

from __future__ import annotations

import logging

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus

log = logging.getLogger(__name__)

IMPROVE_STAGE = "improve"
TAG_DECISION = "imgsearch.improve.decision"
TAG_REASON = "imgsearch.improve.killed_reason"


def _running(client: MlflowClient, filter_string: str) -> list[mlflow.entities.Run]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    return list(
        client.search_runs(
            experiments, filter_string=f"{filter_string} and attributes.status = 'RUNNING'"
        )
    )


def mark_orphans(reason: str, client: MlflowClient | None = None) -> list[str]:
    """Terminate orphaned improve runs and their RUNNING children; returns the run ids marked."""
    client = client or MlflowClient()
    marked: list[str] = []
    for run in _running(client, f"tags.`imgsearch.stage` = '{IMPROVE_STAGE}'"):
        run_id = run.info.run_id
        children = _running(client, f"tags.`mlflow.parentRunId` = '{run_id}'")
        for child in children:
            client.set_tag(child.info.run_id, TAG_REASON, f"orphaned: {reason}")
            client.set_terminated(child.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            marked.append(child.info.run_id)
        client.set_tag(run_id, TAG_DECISION, "killed")
        client.set_tag(run_id, TAG_REASON, f"orphaned: {reason}")
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        marked.append(run_id)
        log.warning("improve run %s was left RUNNING by a killed job: marked KILLED", run_id)
    return marked
