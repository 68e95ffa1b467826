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
from imgsearch.data.limits import DecodeLimits
from imgsearch.embed import query as serving
from imgsearch.errors import ExtractorMismatchError, ImgsearchError
from imgsearch.models.backbones import fingerprint, load_extractor
from imgsearch.search.index import ImageIndex
from imgsearch.search.ranking import RankingConfig
from registry import integrity, models, text_model

log = logging.getLogger(__name__)

# Logged with every model so that load-time model_config can override them (MLflow ignores keys
# that were not logged); $IMGSEARCH_TORCH_THREADS / $IMGSEARCH_SERVING_MODE override both.
SERVING_CONFIG: dict[str, Any] = {
    "allow_paths": False,
    "torch_threads": serving.DEFAULT_THREADS,
    "serving_mode": serving.DEFAULT_MODE,
    # request bounds (rows, pixels per image and per request): see imgsearch.data.limits
    **DecodeLimits().as_config(),
    # filled in at load time by registry.integrity.load_verified, from the version's tags
    integrity.CONFIG_KEY: "",
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
TAG_EVALUATE_RUN = "evaluate_run_id"
TAG_EVAL_SPLIT = "eval_split"
TAG_EVAL_SPLIT_RUN = "eval_split_run_id"
METRIC_TAG_PREFIX = "metric."
#: tags an upstream run records about its inputs (steps.extract / index / evaluate)
INPUT_EXTRACT_RUN = "imgsearch.input.extract_run_id"
INPUT_SPLIT_RUN = "imgsearch.input.split_run_id"
#: set at registration, never rewritten afterwards
FROZEN_TAGS = (TAG_EVALUATE_RUN, TAG_EVAL_SPLIT, TAG_EVAL_SPLIT_RUN, TAG_TEST_SPLIT)
FROZEN_PREFIXES = (METRIC_TAG_PREFIX, integrity.TAG_PREFIX)

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


class EvaluationMismatchError(RegistryError):
    """An evaluation does not belong to the runs or the version it is attached to."""


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
        _check_frozen(existing, extra_tags)
        _ensure_tags(client, existing, {k: v for k, v in extra_tags.items() if not is_frozen(k)})
        version, reused = existing, True
    else:
        info = log_fn()
        tags = {
            **identity,
            TAG_REGISTER_RUN: _active_run_id(),
            **extra_tags,
            integrity.TAG_MODEL_TREE: _logged_tree_sha256(info.model_uri),
        }
        # tags go in with the version in one call, so a found version always has its identity
        version = mlflow.register_model(info.model_uri, name, tags=tags)
        reused = False
        log.info("registered %s version %s", name, version.version)
    if alias:
        client.set_registered_model_alias(name, alias, str(version.version))
    return client.get_model_version(name, str(version.version)), reused


def is_frozen(key: str) -> bool:
    return key in FROZEN_TAGS or key.startswith(FROZEN_PREFIXES)


def _check_frozen(existing: ModelVersion, tags: Mapping[str, str]) -> None:
    """Refuse to change what a version recorded at registration (its evaluation, its metrics,
    its checksums); the same values again are a retry and change nothing."""
    current = existing.tags or {}
    changed = sorted(k for k, v in tags.items() if is_frozen(k) and current.get(k) != v)
    if changed:
        detail = ", ".join(f"{k}: {current.get(k)!r} -> {tags[k]!r}" for k in changed[:6])
        raise EvaluationMismatchError(
            f"{existing.name} version {existing.version} is already registered with other "
            f"frozen tags ({detail}); a registered version's evaluation, metrics and checksums "
            "never change: register new extract/index runs instead"
        )


def _logged_tree_sha256(model_uri: str) -> str:
    """:func:`registry.integrity.tree_sha256` of the model as it now sits in the artifact store
    (the same download :func:`registry.integrity.load_verified` will check)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)
        return integrity.tree_sha256(Path(local))


# --- evaluations -------------------------------------------------------------------------------


def _run_tag(client: MlflowClient, run_id: str, key: str, what: str) -> str:
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise EvaluationMismatchError(f"{what} run {run_id} not found: {exc.message}") from exc
    value = run.data.tags.get(key)
    if not value:
        raise EvaluationMismatchError(
            f"{what} run {run_id} records no {key!r} tag: cannot tell what it measured or holds"
        )
    return str(value)


def check_evaluation(
    client: MlflowClient,
    evaluate_run_id: str,
    *,
    extract_run_id: str | None = None,
    index_run_id: str | None = None,
) -> str:
    """The extract run ``evaluate_run_id`` measured, checked against the runs being registered.

    The evaluate step records its input as tag ``imgsearch.input.extract_run_id``; so does the
    index step. Raises :class:`EvaluationMismatchError` unless the evaluation measured exactly
    ``extract_run_id`` (when given) and the embeddings ``index_run_id`` was built from (when
    given).
    """
    if extract_run_id is None and index_run_id is None:
        raise TypeError("check_evaluation needs extract_run_id and/or index_run_id")
    measured = _run_tag(client, evaluate_run_id, INPUT_EXTRACT_RUN, "evaluate")
    if extract_run_id is not None and measured != extract_run_id:
        raise EvaluationMismatchError(
            f"evaluate run {evaluate_run_id} measured extract run {measured}, not {extract_run_id}: "
            "an evaluation is accepted only for the runs it measured"
        )
    if index_run_id is not None:
        built_from = _run_tag(client, index_run_id, INPUT_EXTRACT_RUN, "index")
        if built_from != measured:
            raise EvaluationMismatchError(
                f"index run {index_run_id} holds the vectors of extract run {built_from}, but "
                f"evaluate run {evaluate_run_id} measured extract run {measured}"
            )
    return measured


def evaluation(
    evaluate_run_id: str,
    cfg: RegisterConfig,
    *,
    extract_run_id: str | None = None,
    index_run_id: str | None = None,
    client: MlflowClient | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """``(metrics, tags)`` to record on the versions made from ``extract_run_id`` /
    ``index_run_id``, after :func:`check_evaluation` (give at least one of them).

    ``metrics``: the run's metrics under ``cfg.metric_prefixes`` (bare names). ``tags``:
    ``evaluate_run_id``, ``eval_split`` / ``eval_split_run_id`` (which split of which split run
    it measured) and ``test_split_hash`` (of ``cfg.per_query_artifact``'s image ids) when known.
    """
    client = client or MlflowClient()
    check_evaluation(
        client, evaluate_run_id, extract_run_id=extract_run_id, index_run_id=index_run_id
    )
    run = client.get_run(evaluate_run_id)
    metrics = select_metrics(run.data.metrics, cfg.metric_prefixes, cfg.metrics or None)
    tags = {TAG_EVALUATE_RUN: evaluate_run_id}
    # an `mlflow run -P split=''` leaves "" under "split" and the value used under "cfg.split"
    params = run.data.params
    split = params.get("evaluate.split") or params.get("cfg.split") or params.get("split")
    if split:
        tags[TAG_EVAL_SPLIT] = split
        if split != "test":
            log.warning("evaluate run %s measured split %r, not 'test'", evaluate_run_id, split)
    split_run = run.data.tags.get(INPUT_SPLIT_RUN)
    if split_run:
        tags[TAG_EVAL_SPLIT_RUN] = split_run
    query_ids = _per_query_ids(client, evaluate_run_id, cfg.per_query_artifact)
    if query_ids is not None:
        tags[TAG_TEST_SPLIT] = test_split_hash(query_ids)
    return metrics, tags


def _per_query_ids(client: MlflowClient, run_id: str, artifact: str) -> list[str] | None:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, artifact, tmp)
            per_query = pd.read_parquet(path)
    except (MlflowException, OSError):
        log.info("no %s in evaluate run %s: test split not recorded", artifact, run_id)
        return None
    if schema.IMAGE_ID not in per_query.columns:
        return None
    return per_query[schema.IMAGE_ID].astype(str).tolist()


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
    tags = {
        **metric_tags(metrics or {}),
        **dict(extra_tags or {}),
        **integrity.artifact_checksums({models.ARTIFACT_EXTRACTOR: extractor_dir}),
    }

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
    text_artifacts: Mapping[str, Path] | None = None,
) -> ModelVersion:
    """Log the index + its extractor + ranking config as an :class:`~registry.models.IndexModel`
    in the active run and register it as ``name``.

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
                        **{k: str(v) for k, v in text_artifacts.items()},
                    },
                    code_paths=code_paths(),
                    signature=models.index_signature(ranking_cfg, default_k, bool(text_artifacts)),
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
    text_artifacts: Mapping[str, Path] | None = None,
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
        text_artifacts=text_artifacts,
    )
    reused = (ext.tags or {}).get(TAG_INDEX_VERSION) == str(idx.version)
    _ensure_tags(client, ext, {TAG_INDEX_VERSION: str(idx.version)})
    ext = client.get_model_version(cfg.extractor_name, str(ext.version))
    return RegisteredPair(extractor=ext, index=idx, reused=reused)
