"""Validate: decode every catalog image safely, fix what can be fixed, quarantine the rest.

Inputs (from the ingest run ``--ingest-run-id``): ``manifest.parquet`` and, when ingest rejected
rows, ``rejected.parquet`` (quarantine schema, stage ``ingest``).

Artifacts:
- ``manifest.parquet``: the clean manifest, plus ``sha256, format, width, height, fixes, phash``;
  ``path`` points at the normalised copy in ``$IMGSEARCH_HOME/clean`` when something was fixed.
- ``quarantine.parquet``: ingest rejections + validate rejections, one row per dropped image with
  ``stage, reason, detail, detected_format``.
- ``near_duplicates.parquet``: perceptual-hash pairs found (dropped or only reported).
Metrics: ``n_input, n_clean, n_quarantined, n_fixed, quarantine.<reason>, fixes.<code>,
format.<FORMAT>, near_duplicate_pairs_*, images_per_s``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from imgsearch import schema
from imgsearch.config import from_dict, home_dir
from imgsearch.data.validate import ValidateConfig, validate
from steps.common import Option, cli, log_df, log_metrics, read_df, stage_run

log = logging.getLogger(__name__)
STAGE = "validate"


def run(
    ingest_run_id: str, overrides: Mapping[str, Any] | None = None, profile: str | None = None
) -> str:
    """Validate the manifest of ``ingest_run_id``; returns this stage's run id.

    ``overrides``: dotted config keys, e.g. ``{"validate.min_size": 64}`` (empty values ignored).
    """
    with stage_run(STAGE, overrides, profile=profile) as (active, cfg):
        manifest = read_df(ingest_run_id, "manifest.parquet")
        ingest_rejected = _ingest_rejections(ingest_run_id)
        result = validate(manifest, from_dict(ValidateConfig, cfg.get(STAGE)), home_dir() / "clean")
        quarantine = pd.concat([ingest_rejected, result.quarantine], ignore_index=True)
        log_metrics(result.metrics)
        log_metrics(
            {"n_quarantined_ingest": len(ingest_rejected), "n_quarantined_total": len(quarantine)}
        )
        log_df(result.clean, "manifest.parquet")
        log_df(quarantine.astype("object"), "quarantine.parquet", view=True)
        log_df(result.near_duplicates, "near_duplicates.parquet", view=True)
        return str(active.info.run_id)


def _ingest_rejections(run_id: str) -> pd.DataFrame:
    names = {a.path for a in MlflowClient().list_artifacts(run_id)}
    if "rejected.parquet" not in names:
        return schema.empty_quarantine()
    rejected = read_df(run_id, "rejected.parquet")
    return rejected.reindex(columns=list(schema.QUARANTINE_COLUMNS))


OPTIONS = (
    Option("--ingest-run-id", "run id of the ingest stage", required=True),
    Option("--min-size", "shorter side in pixels (validate.min_size)", key=f"{STAGE}.min_size"),
    Option(
        "--near-duplicate-scope",
        "item | all | none (validate.near_duplicate_scope)",
        key=f"{STAGE}.near_duplicate_scope",
    ),
    Option(
        "--max-images-per-item",
        "cap per item (validate.max_images_per_item)",
        key=f"{STAGE}.max_images_per_item",
    ),
    Option("--workers", "decoding processes (validate.workers)", key=f"{STAGE}.workers"),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
