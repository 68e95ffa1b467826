"""Register the extractor and the index in the MLflow model registry, alias ``challenger``.

Inputs (run ids):
  --extract-run-id   run holding the ``extractor/`` artifact (a save_extractor directory)
  --index-run-id     run holding the ``index/`` artifact (and ``ranking.yaml`` when tuned)
  --evaluate-run-id  run whose test-split metrics (``map_at_r``...) are recorded on the versions;
                     it must have measured the extract run above, the one the index was built
                     from (registry.register.evaluation), else the step fails and registers nothing

Produces: versions of ``imgsearch-extractor`` and ``imgsearch-index`` tagged with each other's
version, the source runs, the data hash, the extractor fingerprint and ``metric.<name>``; both
aliased ``challenger``. A retried step reuses the versions it made (idempotent). Logs
``registered.json`` and params ``extractor_version`` / ``index_version``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from imgsearch.config import from_dict
from imgsearch.search.ranking import RankingConfig
from registry.register import (
    INPUT_EXTRACT_RUN,
    RegisterConfig,
    evaluation,
    register_pair,
)
from steps.common import artifact_path, base_parser, log_metrics, setup_logging, stage_run

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


def _evaluation(
    evaluate_run_id: str,
    cfg: RegisterConfig,
    *,
    extract_run_id: str | None = None,
    index_run_id: str | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Compatibility name for :func:`registry.register.evaluation` (call that instead, with the
    runs being registered). Without run ids nothing is checked here; the promotion gate still
    refuses figures whose evaluation did not measure the version's own index run."""
    if extract_run_id is None and index_run_id is None:
        log.warning(
            "evaluate run %s not checked against the registered runs: call "
            "registry.register.evaluation(..., index_run_id=...)",
            evaluate_run_id,
        )
        run = MlflowClient().get_run(evaluate_run_id)
        # a missing tag is refused by evaluation() with its reason
        extract_run_id = run.data.tags.get(INPUT_EXTRACT_RUN) or "unrecorded"
    return evaluation(
        evaluate_run_id, cfg, extract_run_id=extract_run_id, index_run_id=index_run_id
    )


def run(
    extract_run_id: str,
    index_run_id: str,
    evaluate_run_id: str,
    overrides: dict[str, Any] | None = None,
    profile: str | None = None,
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
        extractor_dir = artifact_path(extract_run_id, cfg.extractor_artifact)
        index_dir = artifact_path(index_run_id, cfg.index_artifact)
        # refused unless it measured exactly these extract and index runs
        metrics, tags = evaluation(
            evaluate_run_id, cfg, extract_run_id=extract_run_id, index_run_id=index_run_id
        )
        pair = register_pair(
            extractor_dir,
            index_dir,
            _ranking(index_run_id, cfg, all_cfg),
            extractor_run_id=extract_run_id,
            index_run_id=index_run_id,
            metrics=metrics,
            extra_tags=tags,
            cfg=cfg,
        )
        summary = pair.summary()
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


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--extract-run-id", required=True)
    parser.add_argument("--index-run-id", required=True)
    parser.add_argument("--evaluate-run-id", required=True)
    parser.add_argument("--alias", default="", help="alias to set (default: configs/register.yaml)")
    args = parser.parse_args()
    setup_logging()
    run_id = run(
        args.extract_run_id,
        args.index_run_id,
        args.evaluate_run_id,
        overrides={"register.alias": args.alias},
        profile=args.profile or None,
    )
    print(run_id)


if __name__ == "__main__":
    main()
