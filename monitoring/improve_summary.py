"""What one improve job learnt (:class:`JobState`) and how it is recorded on its parent run.

Tags ``imgsearch.improve.*``, the counts, drift and before/after metrics, ``summary.json`` and the
human-readable ``summary.md`` (:func:`summary_markdown`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import mlflow

from steps.common import log_metrics

log = logging.getLogger(__name__)


@dataclass
class JobState:
    """What the job learnt so far; the summary is made from it."""

    decision: str = "skip"
    reason: str = ""
    alert: str = ""  # imgsearch.improve.alert: new_domain when new data was held for review
    promoted: bool = False
    index_extended: bool = False
    champion_before: dict[str, str] = field(default_factory=dict)
    champion_after: dict[str, str] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    drift: dict[str, Any] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def record(state: JobState, failed: bool = False) -> None:
    """Tags, metrics and the summary on the parent run (best effort when the job failed)."""
    try:
        mlflow.set_tags(
            {
                "imgsearch.improve.decision": state.decision,
                "imgsearch.improve.reason": state.reason[:5000],
                "imgsearch.improve.promoted": str(state.promoted).lower(),
                "imgsearch.improve.index_extended": str(state.index_extended).lower(),
            }
        )
        if state.drift.get("kind"):
            mlflow.set_tag("imgsearch.improve.drift_kind", state.drift["kind"])
        if state.alert:
            mlflow.set_tag("imgsearch.improve.alert", state.alert)
        log_metrics(state.counts)
        log_metrics({k: v for k, v in state.drift.items() if k not in ("verdict", "kind")})
        log_metrics({f"before.{k}": v for k, v in state.before.items()})
        log_metrics({f"after.{k}": v for k, v in state.after.items()})
        log_metrics({"promoted": float(state.promoted)})
        mlflow.log_dict(state.summary(), "summary.json")
        mlflow.log_text(summary_markdown(state), "summary.md")
    except Exception as exc:
        if not failed:
            raise
        log.error("could not record the failed job's summary: %s", exc)


def summary_markdown(state: JobState) -> str:
    c = state.counts
    lines = [
        f"# improve: {state.decision}",
        "",
        *([f"**Alert**: {state.alert}", ""] if state.alert else []),
        f"**Why**: {state.reason}",
        "",
        "## What was new",
        f"- catalog images: {int(c.get('n_catalog', 0))}, already taken in: "
        f"{int(c.get('n_already_seen', 0))}",
        f"- new: {int(c.get('n_new', 0))} valid, {int(c.get('n_quarantined', 0))} quarantined, "
        f"{int(c.get('n_deferred', 0))} deferred to a later run; pending (served, not trained on): "
        f"{int(c.get('n_pending', 0))}",
        "",
        "## Drift",
    ]
    if state.drift:
        d = state.drift
        lines.append(
            f"- {d.get('verdict', '?')} (kind {d.get('kind', '?')}): score "
            f"{_fmt(d.get('drift_score'))} vs calibrated threshold {_fmt(d.get('drift_threshold'))}"
            f", effect {_fmt(d.get('drift_effect'))}x (run {state.runs.get('drift', '?')})"
        )
        if "knn_novel_share" in d:
            lines.append(
                f"- {d['knn_novel_share']:.0%} of new images are far from everything in the "
                f"reference (median nearest-neighbour distance {_fmt(d.get('knn_distance_ratio'))}"
                "x the reference's own)"
            )
    else:
        lines.append("- not measured")
    lines += ["", "## Metrics (frozen test split; new = the new data's test items)", ""]
    names = sorted(set(state.before) | set(state.after))
    if names:
        lines += ["| metric | champion (before) | after |", "|---|---|---|"]
        for name in names:
            lines.append(
                f"| {name} | {_fmt(state.before.get(name, ''))} | {_fmt(state.after.get(name, ''))} |"
            )
    else:
        lines.append("(no evaluation)")
    lines += ["", "## Gate"]
    for gate in state.gates or [{"reason": "not run"}]:
        lines.append(
            f"- {gate.get('what', '')}: {'promoted' if gate.get('promoted') else 'kept champion'}"
            f" - {gate.get('reason', '')}"
        )
    lines += [
        "",
        f"champion before: {state.champion_before}",
        f"champion after: {state.champion_after}",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
