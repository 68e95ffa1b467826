"""Log the extractor and the index as pyfunc models and register them, idempotently.

Registered names: ``imgsearch-extractor`` and ``imgsearch-index``. Every version carries tags:

* ``source_run_id``: the run whose artifact was registered (the extract run for the extractor,
  the index run for the index); ``register_run_id``: the run that registered it;
* ``data_hash``: sha256 of what the index covers (see :func:`data_hash_of`);
* ``extractor_fingerprint``: :func:`imgsearch.models.backbones.fingerprint` of the extractor;
* ``extractor_version`` on the index version, ``index_version`` on the extractor version;
* ``metric.<name>``: the frozen test-split metrics (``metric.map_at_r``...) the promotion gate
  compares, and ``test_split_hash`` when known (metrics of different test splits do not compare).

Both get the ``challenger`` alias. Registering is idempotent (RELIABILITY 11): before logging,
the registry is searched for a READY version with the same ``source_run_id``, ``data_hash`` and
``extractor_fingerprint``; a retried step finds that version, completes its tags and alias, and
returns it instead of making another.

An index is registered only with the extractor whose fingerprint it records, and only when its
checksums verify: a mismatched pair or a tampered index is refused before anything is logged.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import math
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

import imgsearch
from imgsearch import schema
from imgsearch.embed import query as serving
from imgsearch.errors import ExtractorMismatchError, ImgsearchError
from imgsearch.models.backbones import fingerprint, load_extractor
from imgsearch.search.index import ImageIndex
from imgsearch.search.ranking import RankingConfig
from registry import models

log = logging.getLogger(__name__)

# Logged with every model so that load-time model_config can override them (MLflow ignores keys
# that were not logged); $IMGSEARCH_TORCH_THREADS / $IMGSEARCH_SERVING_MODE override both.
SERVING_CONFIG: dict[str, Any] = {
    "allow_paths": False,
    "torch_threads": serving.DEFAULT_THREADS,
    "serving_mode": serving.DEFAULT_MODE,
}

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
METRIC_TAG_PREFIX = "metric."

#: Distributions the served model imports; pinned to the installed versions when present.
_RUNTIME_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "torchvision",
    "faiss-cpu",
    "numpy",
    "pandas",
    "pyarrow",
    "pillow",
    "pyyaml",
    "tqdm",
    "scikit-learn",
    "efficientnet-pytorch",
    "efficientnet-lite-pytorch",
)
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:\-]+$")


class RegistryError(ImgsearchError):
    """The registry holds something the lifecycle cannot work with (missing tag, alias...)."""


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


# --- hashes and metrics ------------------------------------------------------------------------


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
            tags[f"{METRIC_TAG_PREFIX}{name}"] = repr(number)
    return tags


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


# --- logging helpers ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _fingerprint_cached(directory: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    return fingerprint(load_extractor(Path(directory)))


def extractor_fingerprint(extractor_dir: Path) -> str:
    """:func:`~imgsearch.models.backbones.fingerprint` of a saved extractor (memoised on the files'
    names, sizes and mtimes: registering a pair loads the weights once, not twice)."""
    directory = Path(extractor_dir).resolve()
    stamp = tuple(
        sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.iterdir()
            if p.is_file()
        )
    )
    return _fingerprint_cached(str(directory), stamp)


#: models-from-code files: MLflow stores and runs them at load time instead of unpickling a model.
MODEL_CODE = Path(__file__).resolve().parent / "model_code"


def code_paths() -> list[str]:
    """The ``imgsearch`` and ``registry`` package directories, shipped inside every model so it
    loads from any working directory, with or without ``pip install`` of the project."""
    return [
        str(Path(imgsearch.__file__).resolve().parent),
        str(Path(models.__file__).resolve().parent),
    ]


def pip_requirements() -> list[str]:
    """Pinned runtime requirements (explicit, so MLflow need not load the model to infer them)."""
    reqs = []
    for dist in _RUNTIME_DISTRIBUTIONS:
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return reqs


def _check_safe(value: str, what: str) -> str:
    if not _SAFE_VALUE.match(value):
        raise RegistryError(f"{what} {value!r} has characters not allowed in a registry filter")
    return value


def _active_run_id() -> str:
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


def _ensure_tags(client: MlflowClient, version: ModelVersion, tags: Mapping[str, str]) -> None:
    current = version.tags or {}
    for key, value in tags.items():
        if current.get(key) != value:
            client.set_model_version_tag(version.name, str(version.version), key, value)


def _register(
    client: MlflowClient,
    name: str,
    source_run_id: str,
    data_hash_: str,
    extractor_fp: str,
    extra_tags: Mapping[str, str],
    alias: str,
    log_fn: Any,
) -> tuple[ModelVersion, bool]:
    """Find-or-create the version; then make sure its tags and alias are set (a retry completes
    what a crashed attempt left undone)."""
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
        _ensure_tags(client, existing, dict(extra_tags))
        version, reused = existing, True
    else:
        info = log_fn()
        tags = {**identity, TAG_REGISTER_RUN: _active_run_id(), **extra_tags}
        # tags go in with the version in one call, so a found version always has its identity
        version = mlflow.register_model(info.model_uri, name, tags=tags)
        reused = False
        log.info("registered %s version %s", name, version.version)
    if alias:
        client.set_registered_model_alias(name, alias, str(version.version))
    return client.get_model_version(name, str(version.version)), reused


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
) -> ModelVersion:
    """Log ``extractor_dir`` (a :func:`~imgsearch.models.backbones.save_extractor` directory) as an
    :class:`~registry.models.ExtractorModel` in the active run and register it as ``name``.

    ``source_run_id`` defaults to the active run. Returns the (possibly pre-existing) version.
    """
    client = client or MlflowClient()
    extractor_dir = Path(extractor_dir)
    fp = extractor_fingerprint(extractor_dir)
    source = source_run_id or _active_run_id()
    tags = {**metric_tags(metrics or {}), **dict(extra_tags or {})}

    def _log() -> Any:
        with _quiet_input_example():
            return mlflow.pyfunc.log_model(
                name="extractor",
                python_model=str(MODEL_CODE / "extractor_model.py"),
                artifacts={models.ARTIFACT_EXTRACTOR: str(extractor_dir)},
                code_paths=code_paths(),
                signature=models.extractor_signature(),
                pip_requirements=pip_requirements(),
                model_config=SERVING_CONFIG,
            )

    version, _ = _register(client, name, source, data_hash, fp, tags, alias, _log)
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
) -> ModelVersion:
    """Log the index + its extractor + ranking config as an :class:`~registry.models.IndexModel`
    in the active run and register it as ``name``.

    Refuses (``ExtractorMismatchError``) an index built with another extractor, and
    (``IndexIntegrityError``) a tampered index, before logging anything. ``extractor_version`` (a
    version of ``extractor_name``) must have the same fingerprint; it is recorded as a tag.
    ``data_hash`` defaults to :func:`data_hash_of` the index metadata.
    """
    client = client or MlflowClient()
    extractor_dir, index_dir = Path(extractor_dir), Path(index_dir)
    fp = extractor_fingerprint(extractor_dir)
    index = ImageIndex.load(index_dir, expected_extractor_fingerprint=fp)
    tags = {**metric_tags(metrics or {}), **dict(extra_tags or {})}
    if extractor_version is not None:
        ext_version = client.get_model_version(extractor_name, str(extractor_version))
        ext_fp = (ext_version.tags or {}).get(TAG_FINGERPRINT)
        if ext_fp != fp:
            raise ExtractorMismatchError(
                f"{extractor_name} version {extractor_version} has fingerprint {ext_fp!r}, "
                f"but the index was built with {fp!r}"
            )
        tags[TAG_EXTRACTOR_VERSION] = str(ext_version.version)
    source = source_run_id or _active_run_id()
    hash_ = data_hash or data_hash_of(index.meta)
    ranking_cfg = ranking_cfg or RankingConfig()

    def _log() -> Any:
        with tempfile.TemporaryDirectory() as tmp:
            ranking_path = Path(tmp) / "ranking.yaml"
            ranking_path.write_text(yaml.safe_dump(_plain(asdict(ranking_cfg)), sort_keys=True))
            with _quiet_input_example():
                return mlflow.pyfunc.log_model(
                    name="index",
                    python_model=str(MODEL_CODE / "index_model.py"),
                    artifacts={
                        models.ARTIFACT_EXTRACTOR: str(extractor_dir),
                        models.ARTIFACT_INDEX: str(index_dir),
                        models.ARTIFACT_RANKING: str(ranking_path),
                    },
                    code_paths=code_paths(),
                    signature=models.index_signature(ranking_cfg, default_k),
                    pip_requirements=pip_requirements(),
                    model_config={**SERVING_CONFIG, "default_k": int(default_k)},
                )

    version, _ = _register(client, name, source, hash_, fp, tags, alias, _log)
    return version


@contextlib.contextmanager
def _quiet_input_example() -> Iterator[None]:
    """No input example on purpose: MLflow would run the model on it while logging (the
    promotion gate's smoke check does that, once, where it matters)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        yield


def _plain(value: Any) -> Any:
    """Tuples -> lists, so the YAML is safe_load-able."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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
) -> RegisteredPair:
    """Register the extractor, then the index tagged with the extractor's version, then tag the
    extractor with the index's version; alias both ``cfg.alias``. Idempotent.

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
    )
    reused = (ext.tags or {}).get(TAG_INDEX_VERSION) == str(idx.version)
    _ensure_tags(client, ext, {TAG_INDEX_VERSION: str(idx.version)})
    ext = client.get_model_version(cfg.extractor_name, str(ext.version))
    return RegisteredPair(extractor=ext, index=idx, reused=reused)
