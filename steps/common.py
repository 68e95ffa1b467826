"""The one place where steps meet MLflow: start a stage run, log its config, hand artifacts on.

Every step module exposes ``run(**params) -> run_id`` (called by ``steps.main`` in-process, nested
under the parent run) and a ``main()`` CLI (called by the MLproject entry point). Steps hand each
other artifacts by run id: :func:`read_df` and :func:`artifact_path` download from ``runs:/<id>/...``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml

from imgsearch.config import flatten, load_config

log = logging.getLogger(__name__)

PROFILE_ENV = "IMGSEARCH_PROFILE"


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@contextlib.contextmanager
def stage_run(
    stage: str, overrides: Mapping[str, Any] | None = None, profile: str | None = None
) -> Iterator[tuple[mlflow.ActiveRun, dict[str, Any]]]:
    """Start the MLflow run of ``stage`` (nested when a parent is active) and log its config.

    ``overrides`` are dotted keys (``{"extract.batch_size": 32}``); empty values keep the config.
    Yields ``(run, cfg)`` where ``cfg`` is the whole effective config.
    """
    profile = profile or os.environ.get(PROFILE_ENV) or None
    cfg = load_config(profile, overrides)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=stage, nested=nested) as run:
        mlflow.set_tag("imgsearch.stage", stage)
        if profile:
            mlflow.set_tag("imgsearch.profile", profile)
        section = cfg.get(stage, {})
        if isinstance(section, Mapping):
            mlflow.log_params({k: _param(_mask(k, v)) for k, v in flatten(section).items()})
        masked = {
            s: ({k: _mask(k, v) for k, v in sec.items()} if isinstance(sec, Mapping) else sec)
            for s, sec in cfg.items()
        }
        mlflow.log_text(yaml.safe_dump(masked, sort_keys=True), "config.yaml")
        yield run, cfg


def _mask(key: str, value: Any) -> Any:
    """Hide a password in a database URL before it is logged (``postgresql://u:***@host/db``)."""
    if key.endswith("url") and isinstance(value, str) and "@" in value:
        try:
            from sqlalchemy.engine import make_url

            return make_url(value).render_as_string(hide_password=True)
        except Exception:  # not a SQLAlchemy URL: log it without its credentials part
            return value.split("@", 1)[-1]
    return value


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the finite numeric entries of ``metrics``; metric names are sanitised for MLflow."""
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            clean[_metric_name(key)] = number
    if clean:
        mlflow.log_metrics(clean, step=step)


def _metric_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def log_df(df: pd.DataFrame, name: str) -> None:
    """Log ``df`` as Parquet artifact ``name`` (for example ``manifest.parquet``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        df.to_parquet(path, index=False)
        mlflow.log_artifact(str(path))


def artifact_path(run_id: str, name: str) -> Path:
    """Local path of artifact ``name`` of run ``run_id`` (downloaded when the store is remote)."""
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name))


def read_df(run_id: str, name: str) -> pd.DataFrame:
    return pd.read_parquet(artifact_path(run_id, name))


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="", help="config profile (configs/profiles/NAME.yaml)")
    return parser
