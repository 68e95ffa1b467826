"""Registered model names, aliases and version tag keys, and the values those tags hold.

The tag keys are documented in :mod:`registry.register`; this module also holds the data and
test-split hashes, the ``metric.<name>`` tags and the frozen-tag rule they share with
:mod:`registry.promote`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities.model_registry import ModelVersion

from imgsearch import schema
from imgsearch.errors import ImgsearchError
from imgsearch.search.index import ImageIndex
from registry import integrity

EXTRACTOR_MODEL = "imgsearch-extractor"
INDEX_MODEL = "imgsearch-index"
CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS = "previous"

# version tag keys
TAG_SOURCE_RUN = "source_run_id"
TAG_REGISTER_RUN = "register_run_id"
TAG_DATA_HASH = "data_hash"
TAG_FINGERPRINT = "extractor_fingerprint"
TAG_EXTRACTOR_VERSION = "extractor_version"
TAG_INDEX_VERSION = "index_version"
TAG_TEST_SPLIT = "test_split_hash"
TAG_EVALUATE_RUN = "evaluate_run_id"
TAG_EVAL_SPLIT = "eval_split"
TAG_EVAL_SPLIT_RUN = "eval_split_run_id"
METRIC_TAG_PREFIX = "metric."
#: decimals a ``metric.<name>`` tag keeps (readable in the UI; the gate re-reads the full figure
#: from the evaluate run and checks that the tag is that figure rounded)
METRIC_TAG_DECIMALS = 4
#: the figures a version description leads with, in this order
HEADLINE_METRICS = ("map_at_r", "hit_at_1", "hit_at_10", "map", "recall_at_10")
#: tags an upstream run records about its inputs (steps.extract / index / evaluate)
INPUT_EXTRACT_RUN = "imgsearch.input.extract_run_id"
INPUT_SPLIT_RUN = "imgsearch.input.split_run_id"
#: the precision the gallery was embedded in (steps.extract: fp32, bf16, or int8 kept on val
#: MAP@R); carried onto the registered versions with the int8 decision's figures and reason
TAG_EXTRACT_PRECISION = "imgsearch.extract.precision"
EXTRACT_INT8_PREFIX = "imgsearch.extract."
#: set at registration, never rewritten afterwards
#: promotion and rollback history (registry.promote, registry.rollback)
TAG_PREVIOUS_CHAMPION = "previous_champion"
TAG_PROMOTED_AT = "promoted_at"
TAG_ROLLED_BACK_AT = "rolled_back_at"
TAG_ROLLED_BACK_TO = "rolled_back_to"
FROZEN_TAGS = (TAG_EVALUATE_RUN, TAG_EVAL_SPLIT, TAG_EVAL_SPLIT_RUN, TAG_TEST_SPLIT)
FROZEN_PREFIXES = (METRIC_TAG_PREFIX, integrity.TAG_PREFIX)


class RegistryError(ImgsearchError):
    """The registry holds something the lifecycle cannot work with (missing tag, alias...)."""


class EvaluationMismatchError(RegistryError):
    """An evaluation does not belong to the runs or the version it is attached to."""


def data_hash_of(meta: pd.DataFrame) -> str:
    """sha256 over the sorted image ids (and each image's file sha256 when the table has it).

    The same images with the same bytes give the same hash, whatever the row order or the other
    columns; a changed, added or removed image changes it.
    """
    if schema.IMAGE_ID not in meta.columns:
        raise RegistryError(f"cannot hash data: no {schema.IMAGE_ID!r} column")
    cols = [c for c in (schema.IMAGE_ID, schema.SHA256) if c in meta.columns]
    rows = sorted(
        "\t".join("" if pd.isna(v) else str(v) for v in row)
        for row in meta[cols].itertuples(index=False)
    )
    digest = hashlib.sha256("\t".join(cols).encode())
    for row in rows:
        digest.update(b"\n" + row.encode())
    return digest.hexdigest()


def index_data_hash(index_dir: Path) -> str:
    """:func:`data_hash_of` a saved index's metadata table (checksums verified first)."""
    return data_hash_of(ImageIndex.load(index_dir).meta)


def test_split_hash(query_ids: list[str]) -> str:
    """sha256 of the sorted test query ids: metrics with different hashes do not compare."""
    digest = hashlib.sha256()
    for qid in sorted(str(q) for q in query_ids):
        digest.update(qid.encode() + b"\n")
    return digest.hexdigest()


def metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            tags[f"{METRIC_TAG_PREFIX}{name}"] = repr(round(number, METRIC_TAG_DECIMALS))
    return tags


def recorded_matches(recorded: float, measured: float) -> bool:
    """Whether a ``metric.*`` tag records ``measured``: rounded as :func:`metric_tags` does, or at
    full precision (versions registered before tags were rounded)."""
    if math.isclose(measured, recorded, rel_tol=1e-9, abs_tol=1e-12):
        return True
    return math.isclose(round(measured, METRIC_TAG_DECIMALS), recorded, rel_tol=0, abs_tol=1e-12)


def select_metrics(
    run_metrics: Mapping[str, float], prefixes: list[str], names: list[str] | None = None
) -> dict[str, float]:
    """Evaluate-run metrics under the first matching prefix, keyed by their bare name."""
    out: dict[str, float] = {}
    for prefix in prefixes:
        for key, value in run_metrics.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            if not name or (names and name not in names) or name in out:
                continue
            if prefix == "" and any(key.startswith(p) for p in prefixes if p):
                continue  # a prefixed key is not also a bare name
            out[name] = float(value)
    return out


def version_metric(version: ModelVersion, name: str) -> float | None:
    raw = (version.tags or {}).get(f"{METRIC_TAG_PREFIX}{name}")
    if raw is None:
        return None
    try:
        number = float(raw)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def is_frozen(key: str) -> bool:
    return key in FROZEN_TAGS or key.startswith(FROZEN_PREFIXES)
