"""Ingest: read an image catalog (SQL database, CSV/Parquet file, or folder tree) into a manifest.

Inputs: ``configs/ingest.yaml`` (``--source``, ``--url``, ``--path``, ``--data-root`` override it).
With no ``url`` for a ``sql`` source, the demo catalog of ``configs/demo.yaml`` is used (fetched
with npm when absent).

Produces: ``manifest.parquet`` (one row per image: ``image_id``, ``item_id``, ``uri``, ``path``,
item attributes, image attributes), ``rejected.parquet`` (quarantine schema: rows refused, with
a reason; bad item texts too), ``texts.parquet`` (item_id, lang, kind, text: the catalog's item
texts, :mod:`imgsearch.data.texts`; read by ``align``), params ``catalog_source`` and ``catalog_data_root``, metrics ``n_items``, ``n_images``,
``n_rejected`` (``n_rejected_<reason>``; ``n_orphan_images`` for SQL).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import mlflow

from imgsearch.config import from_dict
from imgsearch.data.demo import DEMO_TEXTS_TABLE, DemoConfig, demo_catalog
from imgsearch.data.ingest import IngestConfig, ingest
from imgsearch.data.texts import empty_texts
from steps.common import Option, cli, log_df, log_metrics, stage_run

log = logging.getLogger(__name__)

TEXTS_ARTIFACT = "texts.parquet"


def run(overrides: dict[str, Any] | None = None, profile: str | None = None) -> str:
    with stage_run("ingest", overrides, profile) as (active, all_cfg):
        cfg = from_dict(IngestConfig, all_cfg.get("ingest"))
        if cfg.source == "sql" and not cfg.url:
            catalog = demo_catalog(from_dict(DemoConfig, all_cfg.get("demo")))
            cfg = dataclasses.replace(cfg, url=f"sqlite:///{catalog}", texts_table=DEMO_TEXTS_TABLE)
            mlflow.set_tag("imgsearch.demo", "true")
        result = ingest(cfg)
        mlflow.log_params(result.source)
        log_metrics(result.metrics)
        log_df(result.manifest, "manifest.parquet")
        log_df(result.rejected, "rejected.parquet", view=True)
        log_df(result.texts if result.texts is not None else empty_texts(), TEXTS_ARTIFACT)
        return active.info.run_id


OPTIONS = (
    Option(
        "--source",
        "catalog kind (default: config)",
        key="ingest.source",
        choices=["", "sql", "table", "folder"],
    ),
    Option("--url", "SQLAlchemy URL of the catalog database (sql)", key="ingest.url"),
    Option(
        "--path", "CSV/Parquet file (table) or folder of item folders (folder)", key="ingest.path"
    ),
    Option("--data-root", "folder the catalog's uris are resolved in", key="ingest.data_root"),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
