"""The served champion pair and the runs its data, embeddings and frozen test split come from.

``find_champion`` follows the registry's tags back to the runs (index -> extract -> split ->
evaluate); ``monitoring.improve`` builds the next generation on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from imgsearch import schema
from imgsearch.errors import ImgsearchError
from registry import promote as promote_registry
from registry.register import (
    CHAMPION,
    METRIC_TAG_PREFIX,
    TAG_EXTRACTOR_VERSION,
    TAG_FINGERPRINT,
    TAG_SOURCE_RUN,
    TAG_TEST_SPLIT,
)
from steps.common import read_df, setting

log = logging.getLogger(__name__)

INPUT = "imgsearch.input."


@dataclass
class Champion:
    """The served pair and the runs its data, embeddings and frozen test split come from."""

    index_version: str
    extractor_version: str
    fingerprint: str
    extractor_run: str  # holds extractor/
    index_run: str  # holds index/ and ranking.yaml
    embeddings_run: str  # embeddings.parquet of every indexed image
    data_run: str  # manifest.parquet (with split, sha256, pre_path) of every indexed image
    frozen_split_run: str  # manifest.parquet whose test rows are the frozen test split
    metrics: dict[str, float]
    test_split_hash: str | None

    @property
    def extractor_uri(self) -> str:
        return f"runs:/{self.extractor_run}/extractor"


def find_champion(client: MlflowClient, index_name: str, extractor_name: str) -> Champion | None:
    """The ``champion`` pair and its lineage; ``None`` when there is no champion yet."""
    version = (promote_registry.aliases(client, index_name) or {}).get(CHAMPION)
    if version is None:
        return None
    idx = client.get_model_version(index_name, str(version))
    tags = idx.tags or {}
    ext_v = tags.get(TAG_EXTRACTOR_VERSION)
    if not ext_v:
        raise ImgsearchError(f"{index_name} v{idx.version} has no {TAG_EXTRACTOR_VERSION} tag")
    ext = client.get_model_version(extractor_name, ext_v)
    index_run = tags.get(TAG_SOURCE_RUN) or str(idx.run_id)
    extractor_run = (ext.tags or {}).get(TAG_SOURCE_RUN) or str(ext.run_id)
    run_tags = client.get_run(index_run).data.tags
    embeddings_run = run_tags.get(f"{INPUT}extract_run_id") or extractor_run
    data_run = run_tags.get(f"{INPUT}split_run_id") or client.get_run(embeddings_run).data.tags.get(
        f"{INPUT}split_run_id"
    )
    if not data_run:
        raise ImgsearchError(f"cannot find the data of {index_name} v{idx.version} (no split run)")
    frozen = data_run
    evaluate_run = tags.get("evaluate_run_id")
    if evaluate_run:
        frozen = client.get_run(evaluate_run).data.tags.get(f"{INPUT}split_run_id") or data_run
    metrics = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                metrics[key[len(METRIC_TAG_PREFIX) :]] = float(value)
            except ValueError:
                continue
    return Champion(
        index_version=str(idx.version),
        extractor_version=str(ext_v),
        fingerprint=str((ext.tags or {}).get(TAG_FINGERPRINT) or tags.get(TAG_FINGERPRINT)),
        extractor_run=extractor_run,
        index_run=index_run,
        embeddings_run=embeddings_run,
        data_run=data_run,
        frozen_split_run=frozen,
        metrics=metrics,
        test_split_hash=tags.get(TAG_TEST_SPLIT),
    )


def champion_quarantine_ids(client: MlflowClient, data_run: str) -> set[str]:
    """Ids the champion's own validate run quarantined (best effort: data -> preprocess -> validate)."""
    try:
        pre = client.get_run(data_run).data.tags.get(f"{INPUT}preprocess_run_id")
        val = client.get_run(pre).data.tags.get(f"{INPUT}validate_run_id") if pre else None
        if not val:
            return set()
        return set(read_df(val, "quarantine.parquet")[schema.IMAGE_ID].dropna().astype(str))
    except (MlflowException, OSError, KeyError) as exc:
        log.info("champion quarantine not found (%s): the watermark covers it after one run", exc)
        return set()


def split_overrides(client: MlflowClient, split_run: str) -> dict[str, Any]:
    """The frozen split's own settings, so new items are assigned the same way."""
    params = client.get_run(split_run).data.params
    out: dict[str, Any] = {}
    for key in ("by", "seed", "fractions", "stratify_by"):
        value = setting(params, key)
        if value is None:
            continue
        out[f"split.{key}"] = None if value == "None" else value
    if out.get("split.stratify_by") is not None:
        log.warning("the frozen split is stratified: new items may shift category cut points")
    return {k: v for k, v in out.items() if v is not None}
