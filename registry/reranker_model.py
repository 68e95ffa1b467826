"""``imgsearch-reranker``: the learned reranker as a versioned, checksummed, gated registry model.

A version is a pyfunc (:class:`RerankerModel`: the index model's result rows in (``query``,
``rank``, ``image_id``, ``similarity``, ``popularity``, ``category``), the same rows reordered per
query out, with ``first_rank`` and ``rerank_score``; it ships the vote rates it was trained
with, so serving computes the features as training did) tagged with:

* ``index_version`` / ``extractor_version`` / ``extractor_fingerprint``: the index version whose
  candidates (similarities, ranks, vote rates of its images) it was trained on. Loading it for
  another index version is refused (:class:`RerankerMismatchError`): its features would not
  mean the same thing;
* ``sha256.reranker/<file>`` and ``sha256.model`` (:mod:`registry.integrity`), checked before
  the model file is parsed;
* ``metric.<ranking>.ndcg_at_10`` / ``metric.<ranking>.map_at_r`` on held-out queries, for the
  first stage and each trained ranking, and ``metric.ndcg_at_10`` of the registered one.

Gate (:func:`gate`): a version is promoted to ``champion`` only if its held-out NDCG@10 beats
the first-stage ranking's on the same held-out queries by more than ``min_delta``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from imgsearch import schema
from imgsearch.search.reranker import LearnedReranker
from registry import integrity
from registry.packaging import MODEL_CODE, code_paths, pip_requirements, quiet_input_example
from registry.params import _invalid
from registry.served_rerank import ARTIFACT_RERANKER, rerank_top
from registry.tags import (
    CHALLENGER,
    CHAMPION,
    INDEX_MODEL,
    METRIC_TAG_PREFIX,
    TAG_EXTRACTOR_VERSION,
    TAG_FINGERPRINT,
    TAG_INDEX_VERSION,
    RegistryError,
)
from registry.versions import active_run_id, register_version

log = logging.getLogger(__name__)

RERANKER_MODEL = "imgsearch-reranker"
SIMILARITY = "similarity"
TAG_KIND = "reranker_kind"
TAG_GATE = "gate"
GATE_METRIC = "ndcg_at_10"
BASELINE = "first_stage"


class RerankerMismatchError(RegistryError):
    """A reranker version trained for another index version (or without one) was asked for."""


class RerankerModel(PythonModel):
    """First-stage result rows -> the same rows reordered per query (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        integrity.verify_loaded(context, (ARTIFACT_RERANKER,))  # before the file is parsed
        self.reranker = LearnedReranker.load(Path(context.artifacts[ARTIFACT_RERANKER]))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        missing = [c for c in (schema.IMAGE_ID, SIMILARITY) if c not in model_input.columns]
        if missing:
            raise _invalid(f"missing columns {missing}: send the index model's result rows")
        hits = model_input.copy()
        sims = pd.to_numeric(hits[SIMILARITY], errors="coerce").to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(sims)):
            raise _invalid("similarity values must be finite numbers")
        return self.reranker.rerank(hits)


def reranker_signature() -> ModelSignature:
    columns: list[ColSpec | TensorSpec] = [
        ColSpec("long", "query", required=False),
        ColSpec("long", "rank", required=False),
        ColSpec("string", schema.IMAGE_ID),
        ColSpec("double", SIMILARITY),
        ColSpec("double", "popularity", required=False),
        ColSpec("string", schema.CATEGORY, required=False),
    ]
    return ModelSignature(inputs=Schema(columns))


def rerank_hits(reranker: Any, hits: pd.DataFrame, k: int) -> pd.DataFrame:
    """The index model's hits reordered by a loaded reranker pyfunc, cut to ``k`` per query;
    rows without a rank (a query's error row) are kept as they are."""
    return rerank_top(reranker.unwrap_python_model().reranker, hits, k)


def _data_hash(reranker_dir: Path, train_ids: list[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(train_ids):
        digest.update(name.encode() + b"\n")
    digest.update(integrity.tree_sha256(reranker_dir).encode())
    return digest.hexdigest()


def metric_tags(table: pd.DataFrame, chosen: str) -> dict[str, str]:
    """``metric.<ranking>.<metric>`` for every row of a comparison table, and
    ``metric.<metric>`` of the ``chosen`` ranking."""
    tags: dict[str, str] = {}
    for ranking, row in table.iterrows():
        for metric in (GATE_METRIC, "map_at_r"):
            if metric in row and not math.isnan(float(row[metric])):
                tags[f"{METRIC_TAG_PREFIX}{ranking}.{metric}"] = repr(float(row[metric]))
                if ranking == chosen:
                    tags[f"{METRIC_TAG_PREFIX}{metric}"] = repr(float(row[metric]))
    return tags


def log_reranker_model(
    reranker_dir: Path,
    *,
    index_version: str,
    table: pd.DataFrame,
    chosen: str,
    train_ids: list[str],
    kind: str,
    client: MlflowClient | None = None,
    index_name: str = INDEX_MODEL,
    name: str = RERANKER_MODEL,
    alias: str = CHALLENGER,
) -> ModelVersion:
    """Log the saved reranker in the active run and register it, tagged with the index version
    (and that version's extractor) it was trained for; idempotent like the other models."""
    client = client or MlflowClient()
    index_mv = client.get_model_version(index_name, str(index_version))
    index_tags = index_mv.tags or {}
    fp = index_tags.get(TAG_FINGERPRINT, "")
    tags = {
        TAG_INDEX_VERSION: str(index_version),
        TAG_EXTRACTOR_VERSION: index_tags.get(TAG_EXTRACTOR_VERSION, ""),
        TAG_KIND: kind,
        **metric_tags(table, chosen),
        **integrity.artifact_checksums({ARTIFACT_RERANKER: Path(reranker_dir)}),
    }

    def _log() -> Any:
        with quiet_input_example():
            return mlflow.pyfunc.log_model(
                name="reranker",
                python_model=str(MODEL_CODE / "reranker_model.py"),
                artifacts={ARTIFACT_RERANKER: str(reranker_dir)},
                code_paths=code_paths(),
                signature=reranker_signature(),
                pip_requirements=[*pip_requirements(), *_lightgbm()],
                model_config={integrity.CONFIG_KEY: ""},
            )

    source = active_run_id()
    data_hash = _data_hash(Path(reranker_dir), train_ids)
    version, _ = register_version(client, name, source, data_hash, fp, tags, alias, _log)
    return version


def _lightgbm() -> list[str]:
    import importlib.metadata

    try:
        return [f"lightgbm=={importlib.metadata.version('lightgbm')}"]
    except importlib.metadata.PackageNotFoundError:
        return []


def check_index(version: ModelVersion, index_version: str) -> None:
    """Refuse a reranker version trained for another index version."""
    trained_for = (version.tags or {}).get(TAG_INDEX_VERSION)
    if trained_for != str(index_version):
        raise RerankerMismatchError(
            f"{version.name} v{version.version} was trained for {INDEX_MODEL} v{trained_for}, "
            f"not v{index_version}: retrain it (`mlflow run . -e rerank`) for this index"
        )


def load_reranker(
    index_version: str,
    *,
    alias: str = CHAMPION,
    name: str = RERANKER_MODEL,
    client: MlflowClient | None = None,
) -> Any:
    """The ``alias`` reranker as a pyfunc, after checking it belongs to ``index_version`` and
    that its bytes match the registry's checksums."""
    client = client or MlflowClient()
    version = client.get_model_version_by_alias(name, alias)
    check_index(version, index_version)
    return integrity.load_verified(f"models:/{name}/{version.version}", client=client)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    value: float
    baseline: float


def gate(table: pd.DataFrame, chosen: str, min_delta: float = 1e-4) -> GateDecision:
    """Promote only when ``chosen`` beats the first stage's held-out NDCG@10 by > min_delta."""
    value = float(table.loc[chosen, GATE_METRIC])
    baseline = float(table.loc[BASELINE, GATE_METRIC])
    passed = bool(value - baseline > min_delta)
    verdict = "beats" if passed else "does not beat"
    reason = (
        f"{chosen} {GATE_METRIC}={value:.4f} {verdict} {BASELINE} {baseline:.4f} "
        f"(min_delta {min_delta:g}) on held-out queries"
    )
    return GateDecision(passed, reason, value, baseline)


def apply_gate(
    client: MlflowClient, version: ModelVersion, decision: GateDecision, name: str = RERANKER_MODEL
) -> bool:
    """Record the decision on the version; move ``champion`` to it only when it passed."""
    client.set_model_version_tag(name, str(version.version), TAG_GATE, decision.reason[:5000])
    if decision.passed:
        client.set_registered_model_alias(name, CHAMPION, str(version.version))
    log.info("reranker v%s: %s", version.version, decision.reason)
    return decision.passed


def comparison_metrics(table: pd.DataFrame) -> Mapping[str, float]:
    """Flat metrics of a comparison table for ``mlflow.log_metrics``."""
    return {
        f"{ranking}.{metric}": float(row[metric])
        for ranking, row in table.iterrows()
        for metric in (GATE_METRIC, "map_at_r")
        if metric in row
    }
