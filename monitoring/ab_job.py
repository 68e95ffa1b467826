"""The daemon's online A/B report: who wins the team-draft interleaved impressions, by the votes.

Called once per continuous-improvement run (:func:`monitoring.improve.run`). Reads the A/B
impressions (rows with a team, :mod:`registry.impressions`) and the votes from the feedback store
the page writes to (``search.feedback_url`` / ``IMGSEARCH_FEEDBACK_URL``), joins them
(:func:`registry.impressions.labelled`) and computes one report per experiment (index version,
arm A, arm B) with :func:`imgsearch.search.interleave.ab_reports` at ``search.ab.alpha``, naming a
winner only after ``search.ab.min_impressions`` voted impressions. On the active run (the job's
parent run) it logs ``ab_report.json`` (every experiment, the latest first), ``ab_report.md`` and
``ab_impressions.csv`` (the outcome of each impression), the latest experiment's metrics
``ab_wins_a``, ``ab_wins_b``, ``ab_ties``, ``ab_p_value``, ``ab_impressions``, ``ab_voted``, and the
tags ``ab.verdict``, ``ab.arm_a``, ``ab.arm_b``. No A/B impressions: nothing is logged. A store or
registry failure is returned as ``failed: ...`` for the job's reason, never raised.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import sqlalchemy as sa
from mlflow.exceptions import MlflowException

from imgsearch.errors import ImgsearchError
from imgsearch.search.interleave import (
    ARM_A,
    ARM_B,
    ab_reports,
    impression_outcomes,
    report_markdown,
)
from registry.feedback import FeedbackStore, feedback_url
from registry.impressions import ImpressionStore, labelled
from registry.search import load_search_config

log = logging.getLogger(__name__)

#: what a failing report can raise (a bad URL, a store down, an odd row): reported, not raised
_FAILURES = (ImgsearchError, MlflowException, sa.exc.SQLAlchemyError, ValueError, KeyError, OSError)


def report(profile: str | None = None, overrides: dict[str, Any] | None = None) -> str:
    """Compute and log the A/B report (see the module docstring); returns the latest
    experiment's verdict, ``skipped: no A/B impressions`` or ``failed: <why>``."""
    try:
        cfg = load_search_config(profile, overrides)
        url = feedback_url(cfg.feedback_url or None)
        store = ImpressionStore(url)
        try:
            shown = store.impressions(ab_only=True)
            if shown.empty:
                outcome = "skipped: no A/B impressions"
                log.info("A/B report: %s", outcome)
                return outcome
            votes = FeedbackStore(url, engine=store.engine).votes()
        finally:
            store.dispose()
        data = labelled(shown, votes)
        reports = ab_reports(data, alpha=cfg.ab.alpha, min_impressions=cfg.ab.min_impressions)
        latest = reports[0]
        if mlflow.active_run() is not None:
            mlflow.log_dict({"reports": [r.to_dict() for r in reports]}, "ab_report.json")
            mlflow.log_text(report_markdown(reports), "ab_report.md")
            mlflow.log_text(impression_outcomes(data).to_csv(index=False), "ab_impressions.csv")
            r = latest.result
            mlflow.log_metrics(
                {
                    "ab_wins_a": float(r.wins_a),
                    "ab_wins_b": float(r.wins_b),
                    "ab_ties": float(r.ties),
                    "ab_p_value": float(r.p_value),
                    "ab_impressions": float(latest.impressions),
                    "ab_voted": float(latest.voted),
                }
            )
            mlflow.set_tags(
                {
                    "ab.verdict": latest.verdict,
                    "ab.arm_a": latest.experiment.get(ARM_A) or "",
                    "ab.arm_b": latest.experiment.get(ARM_B) or "",
                }
            )
        outcome = latest.verdict
    except _FAILURES as exc:
        outcome = f"failed: {type(exc).__name__}: {exc}"
        log.warning("A/B report: %s", outcome)
        return outcome
    log.info("A/B report: %s (p=%.4g)", outcome, latest.result.p_value)
    return outcome
