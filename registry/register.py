"""Log the extractor and the index as pyfunc models and register them, idempotently.

Registered names: ``imgsearch-extractor`` and ``imgsearch-index``. Every version carries tags:

* ``source_run_id``: the run whose artifact was registered (the extract run for the extractor,
  the index run for the index); ``register_run_id``: the run that registered it;
* ``data_hash``: sha256 of what the index covers (see :func:`data_hash_of`);
* ``extractor_fingerprint``: :func:`imgsearch.models.backbones.fingerprint` of the extractor;
* ``extractor_version`` on the index version, ``index_version`` on the extractor version;
* ``metric.<name>``: the frozen test-split metrics (``metric.map_at_r``...) the promotion gate
  compares, with ``evaluate_run_id`` (the run that measured them), ``eval_split``,
  ``eval_split_run_id`` and ``test_split_hash`` when known (metrics of different test splits do
  not compare). :func:`evaluation` accepts an evaluate run only for the exact extract (and
  index) runs it measured;
* ``sha256.<artifact>/<file>`` and ``sha256.model``: the checksums loading verifies before any
  parser reads a byte (:mod:`registry.integrity`); kept here because the artifact store cannot
  write the registry.

Frozen: once a version exists, its ``metric.*``, evaluation and ``sha256.*`` tags never change.
A retried registration that carries the same values leaves them as they are; one that would
attach another evaluation (or other bytes) to the version is refused
(:class:`EvaluationMismatchError`).

Both get the ``challenger`` alias. Registering is idempotent (RELIABILITY 11): before logging,
the registry is searched for a READY version with the same ``source_run_id``, ``data_hash`` and
``extractor_fingerprint``; a retried step finds that version, completes its tags and alias, and
returns it instead of making another.

An index is registered only with the extractor whose fingerprint it records, and only when its
checksums verify: a mismatched pair or a tampered index is refused before anything is logged.

Where things live: names, tag keys and tag values in :mod:`registry.tags`; the evaluation rules in
:mod:`registry.evaluation`; find-or-create of a version in :mod:`registry.versions`; what a logged
model ships with in :mod:`registry.packaging`. Their public names are re-exported here.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from imgsearch.errors import ExtractorMismatchError
from imgsearch.search.index import ImageIndex
from imgsearch.search.ranking import RankingConfig
from registry import integrity, models, text_model
from registry.evaluation import check_evaluation, evaluation
from registry.packaging import (
    MODEL_CODE,
    SERVING_CONFIG,
    code_paths,
    extractor_fingerprint,
    pip_requirements,
    plain_yaml,
    quiet_input_example,
)
from registry.tags import (
    CHALLENGER,
    CHAMPION,
    EXTRACTOR_MODEL,
    FROZEN_PREFIXES,
    FROZEN_TAGS,
    INDEX_MODEL,
    INPUT_EXTRACT_RUN,
    INPUT_SPLIT_RUN,
    METRIC_TAG_PREFIX,
    PREVIOUS,
    TAG_DATA_HASH,
    TAG_EVAL_SPLIT,
    TAG_EVAL_SPLIT_RUN,
    TAG_EVALUATE_RUN,
    TAG_EXTRACTOR_VERSION,
    TAG_FINGERPRINT,
    TAG_INDEX_VERSION,
    TAG_REGISTER_RUN,
    TAG_SOURCE_RUN,
    TAG_TEST_SPLIT,
    EvaluationMismatchError,
    RegistryError,
    data_hash_of,
    index_data_hash,
    is_frozen,
    metric_tags,
    select_metrics,
    test_split_hash,
    version_metric,
)
from registry.versions import active_run_id, ensure_tags, find_version, register_version

log = logging.getLogger(__name__)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "EXTRACTOR_MODEL",
    "FROZEN_PREFIXES",
    "FROZEN_TAGS",
    "INDEX_MODEL",
    "INPUT_EXTRACT_RUN",
    "INPUT_SPLIT_RUN",
    "METRIC_TAG_PREFIX",
    "MODEL_CODE",
    "PREVIOUS",
    "SERVING_CONFIG",
    "TAG_DATA_HASH",
    "TAG_EVAL_SPLIT",
    "TAG_EVAL_SPLIT_RUN",
    "TAG_EVALUATE_RUN",
    "TAG_EXTRACTOR_VERSION",
    "TAG_FINGERPRINT",
    "TAG_INDEX_VERSION",
    "TAG_REGISTER_RUN",
    "TAG_SOURCE_RUN",
    "TAG_TEST_SPLIT",
    "EvaluationMismatchError",
    "RegisterConfig",
    "RegisteredPair",
    "RegistryError",
    "check_evaluation",
    "code_paths",
    "data_hash_of",
    "evaluation",
    "extractor_fingerprint",
    "find_version",
    "index_data_hash",
    "is_frozen",
    "log_extractor_model",
    "log_index_model",
    "metric_tags",
    "pip_requirements",
    "register_pair",
    "select_metrics",
    "test_split_hash",
    "version_metric",
]


@dataclass
class RegisterConfig:
    """Names and aliases of the registered models, and which evaluation metrics to record.

    ``metric_prefixes``: an evaluate-run metric ``<prefix><name>`` is recorded as
    ``metric.<name>``; the first prefix that matches wins (``test.`` before the bare name).
    ``metrics``: the names to record (empty = every metric found under a prefix).
    ``default_k``: results per query when a request gives no ``k``.
    ``*_artifact``: where the register step finds its inputs in the upstream runs.
    """

    extractor_name: str = EXTRACTOR_MODEL
    index_name: str = INDEX_MODEL
    alias: str = CHALLENGER
    metric_prefixes: list[str] = field(default_factory=lambda: ["test.", "test_", ""])
    metrics: list[str] = field(default_factory=list)
    default_k: int = models.DEFAULT_K
    extractor_artifact: str = "extractor"
    index_artifact: str = "index"
    ranking_artifact: str = "ranking.yaml"
    per_query_artifact: str = "per_query.parquet"


@dataclass
class RegisteredPair:
    extractor: ModelVersion
    index: ModelVersion
    reused: bool  # True when both versions existed already (a retried step)

    def summary(self) -> dict[str, Any]:
        return {
            "extractor_version": str(self.extractor.version),
            "index_version": str(self.index.version),
            "reused": self.reused,
        }


# --- public API --------------------------------------------------------------------------------


def log_extractor_model(
    extractor_dir: Path,
    *,
    data_hash: str,
    source_run_id: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra_tags: Mapping[str, str] | None = None,
    name: str = EXTRACTOR_MODEL,
    alias: str = CHALLENGER,
    client: MlflowClient | None = None,
    description: str | None = None,
) -> ModelVersion:
    """Log ``extractor_dir`` (a :func:`~imgsearch.models.backbones.save_extractor` directory) as an
    :class:`~registry.models.ExtractorModel` in the active run and register it as ``name``.

    ``source_run_id`` defaults to the active run. Returns the (possibly pre-existing) version.
    """
    client = client or MlflowClient()
    extractor_dir = Path(extractor_dir)
    fp = extractor_fingerprint(extractor_dir)
    source = source_run_id or active_run_id()
    tags = {
        **metric_tags(metrics or {}),
        **dict(extra_tags or {}),
        **integrity.artifact_checksums({models.ARTIFACT_EXTRACTOR: extractor_dir}),
    }

    def _log() -> Any:
        with quiet_input_example():
            return mlflow.pyfunc.log_model(
                name="extractor",
                python_model=str(MODEL_CODE / "extractor_model.py"),
                artifacts={models.ARTIFACT_EXTRACTOR: str(extractor_dir)},
                code_paths=code_paths(),
                signature=models.extractor_signature(),
                pip_requirements=pip_requirements(),
                model_config=SERVING_CONFIG,
            )

    version, _ = register_version(
        client, name, source, data_hash, fp, tags, alias, _log, description
    )
    return version


def log_index_model(
    extractor_dir: Path,
    index_dir: Path,
    ranking_cfg: RankingConfig | None = None,
    *,
    data_hash: str | None = None,
    source_run_id: str | None = None,
    extractor_version: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra_tags: Mapping[str, str] | None = None,
    default_k: int = models.DEFAULT_K,
    name: str = INDEX_MODEL,
    extractor_name: str = EXTRACTOR_MODEL,
    alias: str = CHALLENGER,
    client: MlflowClient | None = None,
    text_artifacts: Mapping[str, Path] | None = None,
    description: str | None = None,
    serving_mode: str | None = None,
) -> ModelVersion:
    """Log the index + its extractor + ranking config as an :class:`~registry.models.IndexModel`
    in the active run and register it as ``name``.

    ``serving_mode`` (default: ``SERVING_CONFIG``'s) is the query path the model config asks for;
    ``int8`` is still checked on gallery items at load (:mod:`imgsearch.search.query`).

    ``text_artifacts`` (``text_encoder`` and optionally ``restricted_policy``,
    ``restricted_flags``; :mod:`registry.text_queries`) make it answer text queries; a text
    encoder aligned to another extractor is refused (``ExtractorMismatchError``).

    Refuses (``ExtractorMismatchError``) an index built with another extractor, and
    (``IndexIntegrityError``) a tampered index, before logging anything. ``extractor_version`` (a
    version of ``extractor_name``) must have the same fingerprint; it is recorded as a tag.
    ``data_hash`` defaults to :func:`data_hash_of` the index metadata.
    """
    client = client or MlflowClient()
    extractor_dir, index_dir = Path(extractor_dir), Path(index_dir)
    fp = extractor_fingerprint(extractor_dir)
    index = ImageIndex.load(index_dir, expected_extractor_fingerprint=fp)
    text_artifacts = {k: Path(v) for k, v in (text_artifacts or {}).items()}
    text_tags = text_model.check_text_artifacts(text_artifacts, fp)
    tags = {
        **text_tags,
        **metric_tags(metrics or {}),
        **dict(extra_tags or {}),
        # the index model ships its own copy of the extractor: both are checked at load
        **integrity.artifact_checksums(
            {
                models.ARTIFACT_EXTRACTOR: extractor_dir,
                models.ARTIFACT_INDEX: index_dir,
                **text_artifacts,
            }
        ),
    }
    if extractor_version is not None:
        tags[TAG_EXTRACTOR_VERSION] = _matching_extractor(
            client, extractor_name, extractor_version, fp
        )
    source = source_run_id or active_run_id()
    hash_ = data_hash or data_hash_of(index.meta)
    ranking_cfg = ranking_cfg or RankingConfig()

    def _log() -> Any:
        with tempfile.TemporaryDirectory() as tmp:
            ranking_path = Path(tmp) / "ranking.yaml"
            ranking_path.write_text(yaml.safe_dump(plain_yaml(asdict(ranking_cfg)), sort_keys=True))
            with quiet_input_example():
                return mlflow.pyfunc.log_model(
                    name="index",
                    python_model=str(MODEL_CODE / "index_model.py"),
                    artifacts={
                        models.ARTIFACT_EXTRACTOR: str(extractor_dir),
                        models.ARTIFACT_INDEX: str(index_dir),
                        models.ARTIFACT_RANKING: str(ranking_path),
                        **{k: str(v) for k, v in text_artifacts.items()},
                    },
                    code_paths=code_paths(),
                    signature=models.index_signature(ranking_cfg, default_k, bool(text_artifacts)),
                    pip_requirements=pip_requirements(),
                    model_config={
                        **SERVING_CONFIG,
                        "default_k": int(default_k),
                        "serving_mode": serving_mode or SERVING_CONFIG["serving_mode"],
                    },
                )

    version, _ = register_version(client, name, source, hash_, fp, tags, alias, _log, description)
    return version


def _matching_extractor(client: MlflowClient, extractor_name: str, version: str, fp: str) -> str:
    """``version`` of ``extractor_name``, refused (``ExtractorMismatchError``) unless its
    fingerprint is ``fp``, the one the index was built with."""
    ext_version = client.get_model_version(extractor_name, str(version))
    ext_fp = (ext_version.tags or {}).get(TAG_FINGERPRINT)
    if ext_fp != fp:
        raise ExtractorMismatchError(
            f"{extractor_name} version {version} has fingerprint {ext_fp!r}, "
            f"but the index was built with {fp!r}"
        )
    return str(ext_version.version)


def register_pair(
    extractor_dir: Path,
    index_dir: Path,
    ranking_cfg: RankingConfig | None = None,
    *,
    extractor_run_id: str | None = None,
    index_run_id: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra_tags: Mapping[str, str] | None = None,
    cfg: RegisterConfig | None = None,
    client: MlflowClient | None = None,
    text_artifacts: Mapping[str, Path] | None = None,
    description: str | None = None,
    serving_mode: str | None = None,
) -> RegisteredPair:
    """Register the extractor, then the index tagged with the extractor's version, then tag the
    extractor with the index's version; alias both ``cfg.alias``. Idempotent.
    ``serving_mode``: the index model's query path (:func:`log_index_model`).

    The data hash is that of the index metadata; ``metrics`` (test split) go on both versions.
    """
    cfg = cfg or RegisterConfig()
    client = client or MlflowClient()
    hash_ = index_data_hash(Path(index_dir))
    ext = log_extractor_model(
        extractor_dir,
        data_hash=hash_,
        source_run_id=extractor_run_id,
        metrics=metrics,
        extra_tags=extra_tags,
        name=cfg.extractor_name,
        alias=cfg.alias,
        client=client,
        description=description and f"Extractor of {description}",
    )
    idx = log_index_model(
        extractor_dir,
        index_dir,
        ranking_cfg,
        data_hash=hash_,
        source_run_id=index_run_id,
        extractor_version=str(ext.version),
        metrics=metrics,
        extra_tags=extra_tags,
        default_k=cfg.default_k,
        name=cfg.index_name,
        extractor_name=cfg.extractor_name,
        alias=cfg.alias,
        client=client,
        text_artifacts=text_artifacts,
        description=description and f"Index (FAISS + ranking) of {description}",
        serving_mode=serving_mode,
    )
    reused = (ext.tags or {}).get(TAG_INDEX_VERSION) == str(idx.version)
    ensure_tags(client, ext, {TAG_INDEX_VERSION: str(idx.version)})
    ext = client.get_model_version(cfg.extractor_name, str(ext.version))
    return RegisteredPair(extractor=ext, index=idx, reused=reused)
