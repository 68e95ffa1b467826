"""EDA: a data report people can read, from the validated manifest and its quarantine.

Inputs: ``--validate-run-id`` (its ``manifest.parquet`` and ``quarantine.parquet``); with
``--preprocess-run-id`` the report covers the preprocessed manifest instead and adds that stage's
quarantine rows. ``configs/eda.yaml`` sets the title and the number of sample images.

Produces: ``eda/report.html`` (self-contained: plots embedded, no network) and ``eda/*.png`` (each
plot), and metrics ``n_items``, ``n_images``, ``n_categories``, ``images_per_item_*``,
``quarantine_rate``, ``nsfw_share`` (when the catalog has it), ``format_share_*``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from imgsearch.config import from_dict
from imgsearch.data.eda import EdaConfig, build_report
from steps.common import Option, cli, log_metrics, read_df, stage_run

log = logging.getLogger(__name__)


def run(
    validate_run_id: str,
    preprocess_run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
) -> str:
    with stage_run("eda", overrides, profile) as (active, all_cfg):
        mlflow.set_tag("imgsearch.input.validate_run_id", validate_run_id)
        cfg = from_dict(EdaConfig, all_cfg.get("eda"))
        manifest = read_df(validate_run_id, "manifest.parquet")
        quarantine = read_df(validate_run_id, "quarantine.parquet")
        if preprocess_run_id:
            mlflow.set_tag("imgsearch.input.preprocess_run_id", preprocess_run_id)
            manifest = read_df(preprocess_run_id, "manifest.parquet")
            extra = read_df(preprocess_run_id, "quarantine.parquet")
            quarantine = (
                pd.concat([quarantine, extra], ignore_index=True) if len(extra) else quarantine
            )
        with tempfile.TemporaryDirectory() as tmp:
            report, metrics = build_report(manifest, quarantine, Path(tmp), cfg)
            log_metrics(metrics)
            mlflow.log_artifacts(tmp, artifact_path="eda")
        log.info("eda: report logged as runs:/%s/eda/%s", active.info.run_id, report.name)
        return active.info.run_id


OPTIONS = (
    Option("--validate-run-id", "run whose manifest and quarantine to report on", required=True),
    Option("--preprocess-run-id", "also report this preprocess run's manifest/quarantine"),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
