"""Split: assign every image to train / val / test (by item by default), frozen by a seeded hash.

Inputs: ``--preprocess-run-id`` or ``--validate-run-id`` (exactly one; its ``manifest.parquet``),
``configs/split.yaml`` (``--by``, ``--seed``, ``--fractions`` override it).

Produces: ``manifest.parquet`` (the input manifest plus ``split``), ``split.parquet`` (``image_id``,
``item_id``, ``split``: the frozen assignment the promotion gate compares on) and metrics
``n_items_<split>``, ``n_images_<split>``, ``frac_*``, ``n_test_items_with_2plus_images``,
``n_test_queries``, ``n_items_in_several_splits``.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow

from imgsearch import schema
from imgsearch.config import from_dict
from imgsearch.data.split import SplitConfig, split
from steps.common import Option, cli, log_df, log_metrics, read_df, stage_run

log = logging.getLogger(__name__)


def run(
    validate_run_id: str | None = None,
    preprocess_run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
) -> str:
    if bool(validate_run_id) == bool(preprocess_run_id):
        raise ValueError("give exactly one of validate_run_id and preprocess_run_id")
    source_stage, source_run = (
        ("preprocess", preprocess_run_id) if preprocess_run_id else ("validate", validate_run_id)
    )
    assert source_run is not None
    with stage_run("split", overrides, profile) as (active, all_cfg):
        mlflow.set_tag(f"imgsearch.input.{source_stage}_run_id", source_run)
        cfg = from_dict(SplitConfig, all_cfg.get("split"))
        manifest = read_df(source_run, "manifest.parquet")
        result, metrics = split(manifest, cfg)
        log_metrics(metrics)
        log_df(result, "manifest.parquet")
        log_df(result[[schema.IMAGE_ID, schema.ITEM_ID, schema.SPLIT]], "split.parquet")
        return active.info.run_id


SOURCES = (
    Option("--preprocess-run-id", "run whose manifest.parquet to split"),
    Option("--validate-run-id", "run whose manifest.parquet to split"),
)
OPTIONS = (
    Option("--by", "item | image (default: config)", key="split.by"),
    Option("--seed", "hash seed (default: config)", key="split.seed"),
    Option("--fractions", "train,val,test as YAML, e.g. '[0.6, 0.2, 0.2]'", key="split.fractions"),
)


def main() -> None:
    cli(run, __doc__, OPTIONS, one_of=SOURCES)


if __name__ == "__main__":
    main()
