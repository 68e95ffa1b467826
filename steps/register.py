"""Register the extractor and the index in the MLflow model registry, alias ``challenger``.

Inputs (run ids):
  --extract-run-id   run holding the ``extractor/`` artifact (a save_extractor directory)
  --index-run-id     run holding the ``index/`` artifact (and ``ranking.yaml`` when tuned)
  --evaluate-run-id  run whose test-split metrics (``map_at_r``...) are recorded on the versions;
                     it must have measured the extract run above, the one the index was built
                     from (registry.register.evaluation), else the step fails and registers nothing

  --align-run-id     optional: an align run of the same extract run; its text encoder, policy and
                     image flags ship in the index model (text queries), and ``imgsearch-text``
                     is registered, tagged with the extractor and index versions

Produces: versions of ``imgsearch-extractor`` and ``imgsearch-index`` tagged with each other's
version, the source runs, the data hash, the extractor fingerprint and ``metric.<name>``; both
aliased ``challenger``. A retried step reuses the versions it made (idempotent). Logs
``registered.json`` and params ``extractor_version`` / ``index_version``.

The extract run's precision travels with the pair: tag ``imgsearch.extract.precision`` (the
precision its gallery vectors were embedded in) and, when it asked for int8, the decision's
reason and MAP@R figures (``imgsearch.extract.int8_*``). An extract run that kept int8 (its val
MAP@R within tolerance of fp32's) registers an index model whose ``serving_mode`` is ``int8``,
which serving checks again on gallery items at load (``imgsearch.search.query``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from imgsearch.config import from_dict
from imgsearch.search.ranking import RankingConfig
from registry.register import (
    RegisterConfig,
    evaluation,
    register_pair,
    select_metrics,
)
from registry.tags import EXTRACT_INT8_PREFIX, TAG_EXTRACT_PRECISION
from registry.text_model import log_text_model
from registry.text_queries import TEXT_ARTIFACTS
from registry.versions import describe
from steps.common import Option, artifact_path, cli, log_metrics, stage_run
from steps.runs import current_label

log = logging.getLogger(__name__)


def _ranking(index_run_id: str, cfg: RegisterConfig, all_cfg: dict[str, Any]) -> RankingConfig:
    """The index run's tuned ``ranking.yaml``, else the ``ranking`` config section, else defaults."""
    try:
        path = artifact_path(index_run_id, cfg.ranking_artifact)
        data = yaml.safe_load(Path(path).read_text()) or {}
        section = data.get("ranking", data) if isinstance(data, dict) else {}
        return from_dict(RankingConfig, section)
    except (MlflowException, OSError):
        log.info(
            "no %s in index run %s; using the ranking config", cfg.ranking_artifact, index_run_id
        )
    section = all_cfg.get("ranking")
    return from_dict(RankingConfig, section if isinstance(section, dict) else {})


#: the extract run's int8 figures carried onto the registered versions
INT8_FIGURES = ("int8_used", "int8_map_at_r_fp32", "int8_map_at_r_int8", "int8_map_at_r_mixed")


def precision_tags(extract_run_id: str) -> tuple[dict[str, str], str | None]:
    """The extract run's precision and int8 decision as version tags, and the index model's
    serving mode (``int8`` when the run kept int8, else None = the default)."""
    data = mlflow.get_run(extract_run_id).data
    precision = data.tags.get(TAG_EXTRACT_PRECISION) or data.params.get("precision_used", "fp32")
    tags = {TAG_EXTRACT_PRECISION: precision}
    if "int8_reason" in data.params:
        tags[EXTRACT_INT8_PREFIX + "int8_reason"] = data.params["int8_reason"]
        for key in INT8_FIGURES:
            if key in data.metrics:
                tags[EXTRACT_INT8_PREFIX + key] = f"{data.metrics[key]:.4f}"
    return tags, ("int8" if precision == "int8" else None)


def _description(evaluate_run_id: str, cfg: RegisterConfig, all_cfg: dict[str, Any]) -> str:
    """What the pair is (the run's label: ``baseline mobilenet_v2``...) and every test figure."""
    backbone = (all_cfg.get("extract") or {}).get("backbone", "")
    what = current_label() or str(backbone)
    figures = select_metrics(mlflow.get_run(evaluate_run_id).data.metrics, cfg.metric_prefixes)
    return describe(f"the {what} model", figures, evaluate_run_id)


def run(
    extract_run_id: str,
    index_run_id: str,
    evaluate_run_id: str,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
    align_run_id: str | None = None,
) -> str:
    with stage_run("register", overrides, profile) as (active, all_cfg):
        cfg = from_dict(RegisterConfig, all_cfg.get("register"))
        mlflow.set_tags(
            {
                "extract_run_id": extract_run_id,
                "index_run_id": index_run_id,
                "evaluate_run_id": evaluate_run_id,
            }
        )
        if align_run_id:
            mlflow.set_tag("align_run_id", align_run_id)
        texts = {a: artifact_path(align_run_id, a) for a in TEXT_ARTIFACTS} if align_run_id else {}
        extractor_dir = artifact_path(extract_run_id, cfg.extractor_artifact)
        index_dir = artifact_path(index_run_id, cfg.index_artifact)
        # refused unless it measured exactly these extract and index runs
        metrics, tags = evaluation(
            evaluate_run_id, cfg, extract_run_id=extract_run_id, index_run_id=index_run_id
        )
        carried, serving_mode = precision_tags(extract_run_id)
        tags = {**tags, **carried}
        pair = register_pair(
            extractor_dir,
            index_dir,
            _ranking(index_run_id, cfg, all_cfg),
            extractor_run_id=extract_run_id,
            index_run_id=index_run_id,
            metrics=metrics,
            extra_tags=tags,
            cfg=cfg,
            text_artifacts=texts,
            description=_description(evaluate_run_id, cfg, all_cfg),
            serving_mode=serving_mode,
        )
        summary = pair.summary()
        if align_run_id:
            text = log_text_model(
                texts,
                extractor_version=pair.extractor,
                index_version=pair.index,
                source_run_id=align_run_id,
                alias=cfg.alias,
            )
            summary["text_version"] = str(text.version)
            mlflow.log_param("text_version", text.version)
        mlflow.log_params(
            {
                "extractor_version": summary["extractor_version"],
                "index_version": summary["index_version"],
            }
        )
        mlflow.set_tag("register.reused", str(pair.reused).lower())
        log_metrics({f"registered.{k}": v for k, v in metrics.items()})
        mlflow.log_dict({**summary, "metrics": metrics, "tags": tags}, "registered.json")
        log.info(
            "registered %s v%s and %s v%s as %s%s",
            cfg.extractor_name,
            pair.extractor.version,
            cfg.index_name,
            pair.index.version,
            cfg.alias,
            " (existing versions)" if pair.reused else "",
        )
        return active.info.run_id


OPTIONS = (
    Option("--extract-run-id", required=True),
    Option("--index-run-id", required=True),
    Option("--evaluate-run-id", required=True),
    Option("--align-run-id", "align run: its text encoder ships in the index (text queries)"),
    Option("--alias", "alias to set (default: configs/register.yaml)", key="register.alias"),
)


def main() -> None:
    cli(run, __doc__, OPTIONS)


if __name__ == "__main__":
    main()
