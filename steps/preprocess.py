"""Preprocess: resize every validated image once, into the content-addressed cache.

Inputs: ``--validate-run-id`` (its ``manifest.parquet``), ``configs/preprocess.yaml`` (``--size``,
``--resize`` override it). The cache lives in ``$IMGSEARCH_HOME/pre`` and is keyed by image sha256
and config hash, so a re-run decodes nothing.

Produces: ``manifest.parquet`` (the images that preprocessed, with ``pre_path``),
``quarantine.parquet`` (this stage's failures, stage="preprocess"; may be empty), ``preprocess.json``
(the config, as an extractor carries it) and metrics ``n``, ``n_ok``, ``n_failed``, ``cache_hits``,
``cache_misses``, ``images_per_s``.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow

from imgsearch.config import from_dict, home_dir
from imgsearch.data.preprocess import PreprocessConfig, preprocess
from steps.common import Option, cli, log_df, log_metrics, read_df, stage_run

log = logging.getLogger(__name__)


def run(
    validate_run_id: str, overrides: dict[str, Any] | None = None, profile: str | None = None
) -> str:
    with stage_run("preprocess", overrides, profile) as (active, all_cfg):
        mlflow.set_tag("imgsearch.input.validate_run_id", validate_run_id)
        cfg = from_dict(PreprocessConfig, all_cfg.get("preprocess"))
        manifest = read_df(validate_run_id, "manifest.parquet")
        result = preprocess(manifest, cfg, home_dir() / "pre")
        log_metrics(result.metrics)
        log_df(result.manifest, "manifest.parquet")
        log_df(result.quarantine, "quarantine.parquet", view=True)
        mlflow.log_dict(cfg.to_dict(), "preprocess.json")
        return active.info.run_id


OPTIONS = (
    Option("--validate-run-id", "run whose manifest.parquet to preprocess", required=True),
    Option("--size", "output side in pixels (default: config)", key="preprocess.size"),
    Option(
        "--resize",
        "resize_center_crop | letterbox | squash (default: config)",
        key="preprocess.resize",
    ),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
