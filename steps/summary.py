"""What a person reads about a ``main`` run: its effective settings, its headline figures before
and after fine-tuning, the gate's decision, where the reports are and what to run next.

``steps.main`` logs :func:`effective_params` as params, sets :func:`description` as the run's
description (the MLflow UI shows it on the run page) and prints :func:`closing_summary` at the end
of ``make demo`` (also logged as ``summary.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import mlflow

#: the figures a reviewer looks at first, in this order (``before_after.csv`` starts with them)
HEADLINE_FIRST = ("map_at_r", "hit_at_1", "hit_at_10", "map")
#: the fine-tuning recipe's settings worth seeing beside the figures
RECIPE_KEYS = (
    "method",
    "epochs",
    "batch_size",
    "lr",
    "images_per_item",
    "head_dims",
    "train_size",
    "augment",
    "max_minutes",
)

NEXT_COMMANDS = (
    ("make ui", "the runs, the compare view and the registry on http://127.0.0.1:5000"),
    ("make serve", "search over HTTP with imgsearch-index@champion on 127.0.0.1:5001"),
    ("make search-ui", "the search page on http://localhost:8501"),
    (
        "make drift",
        "drift you can try: another vendor's drawings vs the others, and an A/A that is not drift",
    ),
    (
        "make rerank",
        "a learned reranker from simulated users, gated; `make serve` and the page then use it",
    ),
    (
        ".venv/bin/python -m monitoring.improve --limit N",
        "the continuous-improvement job (drift report, gated challenger); docs/monitoring.md: a scenario",
    ),
)


def effective_params(
    cfg: Mapping[str, Any], profile: str | None, finetune: bool, promote: bool
) -> dict[str, Any]:
    """What ``main`` runs with, resolved from the config (not the empty ``-P`` defaults)."""
    extract = cfg.get("extract") or {}
    ft = cfg.get("finetune") or {}
    backbone = str(extract.get("backbone", ""))
    out: dict[str, Any] = {
        "profile": profile or "default",
        "backbone": backbone,
        "weights": extract.get("weights"),
        "limit": (cfg.get("demo") or {}).get("limit") or "all",
        "source": (cfg.get("ingest") or {}).get("source"),
        "factory": (cfg.get("index") or {}).get("factory"),
        "finetune": finetune,
        "promote": promote,
    }
    if finetune:
        out.update({f"finetune.{k}": ft.get(k) for k in RECIPE_KEYS if k in ft})
        frozen = ft.get("freeze_blocks")
        if isinstance(frozen, Mapping):
            frozen = frozen.get(backbone, frozen.get("default"))
        out["finetune.freeze_blocks"] = frozen
    return out


def ordered_metrics(names: Sequence[str]) -> list[str]:
    """The headline metrics first (:data:`HEADLINE_FIRST`), then the rest alphabetically."""
    head = [n for n in HEADLINE_FIRST if n in names]
    return head + sorted(n for n in names if n not in head)


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def figures_table(before: Mapping[str, float], after: Mapping[str, float] | None) -> list[str]:
    """Markdown rows of the headline figures (baseline, and fine-tuned with the ratio)."""
    if after is None:
        rows = ["| metric | baseline |", "|---|---|"]
        return rows + [f"| {n} | {_fmt(before.get(n))} |" for n in HEADLINE_FIRST]
    rows = ["| metric | baseline | fine-tuned | ratio |", "|---|---|---|---|"]
    for n in HEADLINE_FIRST:
        b, a = before.get(n), after.get(n)
        ratio = a / b if a is not None and b else None
        rows.append(f"| {n} | {_fmt(b)} | {_fmt(a)} | {_fmt(ratio)} |")
    return rows


def description(params: Mapping[str, Any], figures: list[str] | None = None) -> str:
    """The ``main`` run's description: what it is, its settings, and (once known) its figures."""
    lines = [
        f"imgsearch pipeline on the `{params.get('profile')}` profile: "
        f"{params.get('backbone')} ({params.get('weights')} weights), "
        f"{'fine-tuned after the baseline' if params.get('finetune') else 'no fine-tuning'}; "
        "test split = items never seen in training.",
    ]
    if figures:
        lines += ["", "Test-split figures:", "", *figures]
    return "\n".join(lines)


def gate_line(promote_run_id: str | None) -> str:
    """The gate's decision in one line, from a promote run's tags."""
    if not promote_run_id:
        return "gate: not run (--no-promote)"
    tags = mlflow.get_run(promote_run_id).data.tags
    verdict = "promoted" if tags.get("promote.promoted") == "true" else "not promoted"
    version = tags.get("promote.challenger_version", "?")
    return f"gate: index v{version} {verdict}: {tags.get('promote.reason', '')}"


def closing_summary(
    parent_run_id: str,
    figures: list[str],
    gates: Sequence[str],
    reports: Mapping[str, str],
) -> str:
    """The text ``make demo`` ends with (markdown, readable as plain text)."""
    run = mlflow.get_run(parent_run_id)
    experiment = mlflow.MlflowClient().get_experiment(run.info.experiment_id).name
    lines = [
        f"## imgsearch: run `{run.info.run_name}` ({parent_run_id})",
        "",
        "Headline figures on the test split:",
        "",
        *figures,
        "",
        *(f"- {g}" for g in gates),
        "",
        f"Reports (MLflow UI: experiment `{experiment}`, the artifacts tab of each run):",
        *(f"- {what}: {where}" for what, where in reports.items()),
        "",
        "Next:",
        *(f"- `{cmd}`: {what}" for cmd, what in NEXT_COMMANDS),
    ]
    return "\n".join(lines)
