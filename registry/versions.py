"""Find-or-create a registered model version, idempotently (RELIABILITY 11).

A retried registration finds the READY version made from the same run, data and extractor,
completes its tags and alias, and refuses to change its frozen tags.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from registry import integrity
from registry.tags import (
    HEADLINE_METRICS,
    METRIC_TAG_PREFIX,
    TAG_DATA_HASH,
    TAG_FINGERPRINT,
    TAG_REGISTER_RUN,
    TAG_SOURCE_RUN,
    EvaluationMismatchError,
    RegistryError,
    is_frozen,
    recorded_matches,
)

log = logging.getLogger(__name__)

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:\-]+$")


def _check_safe(value: str, what: str) -> str:
    if not _SAFE_VALUE.match(value):
        raise RegistryError(f"{what} {value!r} has characters not allowed in a registry filter")
    return value


def active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise RegistryError("log_*_model must run inside an MLflow run (mlflow.start_run())")
    return run.info.run_id


def find_version(
    client: MlflowClient, name: str, source_run_id: str, data_hash_: str, extractor_fp: str
) -> ModelVersion | None:
    """The newest READY version of ``name`` made from this run, data and extractor, if any."""
    query = (
        f"name = '{_check_safe(name, 'model name')}'"
        f" and tags.{TAG_SOURCE_RUN} = '{_check_safe(source_run_id, 'run id')}'"
        f" and tags.{TAG_DATA_HASH} = '{_check_safe(data_hash_, 'data hash')}'"
        f" and tags.{TAG_FINGERPRINT} = '{_check_safe(extractor_fp, 'fingerprint')}'"
    )
    try:
        found = client.search_model_versions(query)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    ready = [v for v in found if v.status in ("READY", None)]
    return max(ready, key=lambda v: int(v.version)) if ready else None


def ensure_tags(client: MlflowClient, version: ModelVersion, tags: Mapping[str, str]) -> None:
    current = version.tags or {}
    for key, value in tags.items():
        if current.get(key) != value:
            client.set_model_version_tag(version.name, str(version.version), key, value)


def register_version(
    client: MlflowClient,
    name: str,
    source_run_id: str,
    data_hash_: str,
    extractor_fp: str,
    extra_tags: Mapping[str, str],
    alias: str,
    log_fn: Any,
    description: str | None = None,
) -> tuple[ModelVersion, bool]:
    """Find-or-create the version; then make sure its tags, description and alias are set (a
    retry completes what a crashed attempt left undone)."""
    existing = find_version(client, name, source_run_id, data_hash_, extractor_fp)
    identity = {
        TAG_SOURCE_RUN: source_run_id,
        TAG_DATA_HASH: data_hash_,
        TAG_FINGERPRINT: extractor_fp,
    }
    if existing is not None:
        log.info(
            "%s version %s already registered for run %s", name, existing.version, source_run_id
        )
        _check_frozen(existing, extra_tags)
        ensure_tags(client, existing, {k: v for k, v in extra_tags.items() if not is_frozen(k)})
        version, reused = existing, True
    else:
        info = log_fn()
        tags = {
            **identity,
            TAG_REGISTER_RUN: active_run_id(),
            **extra_tags,
            integrity.TAG_MODEL_TREE: _logged_tree_sha256(info.model_uri),
        }
        # tags go in with the version in one call, so a found version always has its identity
        version = mlflow.register_model(info.model_uri, name, tags=tags)
        reused = False
        log.info("registered %s version %s", name, version.version)
    if description and (version.description or "") != description:
        client.update_model_version(name, str(version.version), description=description[:4000])
    if alias:
        client.set_registered_model_alias(name, alias, str(version.version))
    return client.get_model_version(name, str(version.version)), reused


def describe(what: str, metrics: Mapping[str, float], evaluate_run_id: str | None = None) -> str:
    """A version's description: what it is, its headline test figures, then every other one
    (its ``metric.*`` tags keep only a few, rounded)."""
    head = [n for n in HEADLINE_METRICS if n in metrics]
    figures = ", ".join(f"{n} {metrics[n]:.3f}" for n in head)
    text = f"{what}." + (f" Test split: {figures}." if figures else "")
    rest = sorted(n for n in metrics if n not in head)
    if rest:
        source = f" (evaluate run {evaluate_run_id})" if evaluate_run_id else ""
        text += f"\n\nAll test figures{source}: " + ", ".join(f"{n} {metrics[n]:.4g}" for n in rest)
    return text


def _check_frozen(existing: ModelVersion, tags: Mapping[str, str]) -> None:
    """Refuse to change what a version recorded at registration (its evaluation, its metrics,
    its checksums); the same values again are a retry and change nothing."""
    current = existing.tags or {}
    changed = sorted(
        k for k, v in tags.items() if is_frozen(k) and not _same_tag(k, current.get(k), v)
    )
    if changed:
        detail = ", ".join(f"{k}: {current.get(k)!r} -> {tags[k]!r}" for k in changed[:6])
        raise EvaluationMismatchError(
            f"{existing.name} version {existing.version} is already registered with other "
            f"frozen tags ({detail}); a registered version's evaluation, metrics and checksums "
            "never change: register new extract/index runs instead"
        )


def _same_tag(key: str, current: str | None, new: str) -> bool:
    """Equal, or a ``metric.*`` figure recorded at full precision that ``new`` rounds."""
    if current == new:
        return True
    if current is None or not key.startswith(METRIC_TAG_PREFIX):
        return False
    try:
        return recorded_matches(float(new), float(current))
    except ValueError:
        return False


def _logged_tree_sha256(model_uri: str) -> str:
    """:func:`registry.integrity.tree_sha256` of the model as it now sits in the artifact store
    (the same download :func:`registry.integrity.load_verified` will check)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)
        return integrity.tree_sha256(Path(local))
