"""The Spark engine of batch extraction: the same :class:`~imgsearch.embed.runner.Runner`, once per
partition (clip-retrieval's ``PysparkDistributor``).

The manifest becomes a Spark DataFrame (read from Parquet), range-partitioned on its row position so
each partition is a contiguous slice in manifest order. Every partition runs on an executor's
Python worker: the extractor is loaded there from a saved extractor directory once per worker
(:func:`_worker_extractor` caches it for the worker's life; Spark reuses Python workers), the
runner reads -> maps -> writes the slice, and the writer saves it as shard
``out/part-<partition>.parquet`` with the schema of the single file (:mod:`imgsearch.embed.files`),
written under a hidden name and renamed, so a retried task never leaves half a shard. Bad files
are failure rows, as in the local engine; only counters and failure rows travel back to the driver.

Why the runner per partition rather than ``mlflow.pyfunc.spark_udf``: the extract stage embeds with
an extractor that is not registered yet (a fresh backbone or a fine-tuning run's output; only
``register`` comes later), and ``spark_udf`` serves registered or logged pyfunc models, fed in Arrow
batches whose size the CNN does not choose, returning one column through Spark's writer
(``array<float>`` without the fixed size or the file metadata, so not the schema of the local
file). A failure must be encoded in that return column, else one bad file fails the task; with
``env_manager="virtualenv"``/``"conda"`` every executor rebuilds the model's environment, and every
executor downloads the model from the tracking server. The runner per partition reuses the local
engine's reader, mapper (bf16/compile checks) and writer unchanged, so both engines give the same
vectors and the same failure rows.

The extractor directory and ``out`` must be on storage every executor sees (any path in
``local[*]``; a shared filesystem on a cluster). pyspark is imported lazily: the library imports
without it (``pip install '.[spark]'``).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from imgsearch import schema
from imgsearch.config import from_dict
from imgsearch.embed.extract import ExtractConfig, build_runner, check_manifest
from imgsearch.embed.files import shard_paths
from imgsearch.embed.mapper import resolve_device
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor, fingerprint, load_extractor

log = logging.getLogger(__name__)

#: Manifest columns shipped to the executors (the reader needs no more; failure rows use all).
COLUMNS = (schema.IMAGE_ID, schema.ITEM_ID, schema.URI, schema.PATH, schema.PRE_PATH)
POSITION = "_imgsearch_pos"


@dataclass
class SparkConfig:
    """Settings of the Spark engine (``extract.spark`` in ``configs/extract.yaml``).

    master: any Spark master URL; ``local[*]`` uses every core of this machine.
    partitions: ``"auto"`` = max(Spark's default parallelism, rows / ``rows_per_partition``),
        at most one per row; or an int.
    threads_per_task: torch threads in each task (``auto`` = ``spark.task.cpus``).
    conf: extra Spark settings (``spark.driver.memory``, ...).
    """

    master: str = "local[*]"
    app_name: str = "imgsearch-extract"
    partitions: int | str = "auto"
    rows_per_partition: int = 20_000
    threads_per_task: int | str = "auto"
    conf: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("partitions", "threads_per_task"):
            value = getattr(self, name)
            if value != "auto" and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(
                    f"SparkConfig.{name} must be 'auto' or an int >= 1, got {value!r}"
                )
        if self.rows_per_partition < 1:
            raise ConfigError("SparkConfig.rows_per_partition must be >= 1")


@dataclass
class SparkExtractResult:
    """What the Spark pass made: the shard folder, failure rows and the pass's metrics."""

    shards: Path  # folder of part-*.parquet (read with imgsearch.embed.files)
    failures: pd.DataFrame  # quarantine schema, stage="extract"
    metrics: dict[str, Any]


@dataclass(frozen=True)
class _Job:
    """Everything a partition needs, small and picklable (shipped to every task)."""

    extractor_dir: str
    extractor_fingerprint: str
    cfg: ExtractConfig
    threads: int
    out_dir: str
    metadata: dict[str, str]


def require_pyspark() -> Any:
    """``pyspark``, or :class:`ConfigError` saying how to install it."""
    try:
        import pyspark
    except ImportError as exc:
        raise ConfigError(
            "extract.engine=spark needs pyspark: pip install 'imgsearch[spark]' (and Java 17)"
        ) from exc
    return pyspark


def spark_session(cfg: SparkConfig) -> tuple[Any, bool]:
    """The active Spark session, or a new one from ``cfg``: ``(session, created_here)``.

    Executors run this interpreter (``PYSPARK_PYTHON``, unless already set), so they import the
    same ``imgsearch``.
    """
    require_pyspark()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(cfg.master).appName(cfg.app_name)
    builder = builder.config("spark.python.worker.reuse", "true")
    builder = builder.config("spark.ui.showConsoleProgress", "false")
    for key, value in cfg.conf.items():
        builder = builder.config(key, str(value))
    return builder.getOrCreate(), True


# --- on the executors ---------------------------------------------------------------------------
_EXTRACTORS: dict[tuple[str, str], Extractor] = {}
#: How many times this Python process loaded an extractor (a test reads it).
_LOADS = 0


def _worker_extractor(job: _Job) -> tuple[Extractor, bool]:
    """The job's extractor, loaded once per Python worker: ``(extractor, loaded_now)``."""
    global _LOADS
    key = (job.extractor_dir, job.extractor_fingerprint)
    if key in _EXTRACTORS:
        return _EXTRACTORS[key], False
    extractor = load_extractor(Path(job.extractor_dir))
    if fingerprint(extractor) != job.extractor_fingerprint:
        raise ConfigError(f"{job.extractor_dir} changed since the job started (fingerprint)")
    _EXTRACTORS.clear()  # one model per worker: a new job's model replaces the last one
    _EXTRACTORS[key] = extractor
    _LOADS += 1
    return extractor, True


def _task_device(cfg: ExtractConfig) -> torch.device:
    """The GPU Spark gave this task (its resource address), else ``cfg.device``."""
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if context is not None else None
    if gpus is not None and gpus.addresses:
        return torch.device(f"cuda:{gpus.addresses[0]}")
    return resolve_device(cfg.device)


def _save_shard(writer: Any, out_dir: str, index: int, metadata: Mapping[str, str]) -> str:
    final = Path(out_dir) / f"part-{index:05d}.parquet"
    tmp = Path(out_dir) / f".part-{index:05d}-{uuid.uuid4().hex[:8]}.parquet"
    writer.save(tmp, metadata)
    os.replace(tmp, final)  # a retried task replaces its shard whole
    return str(final)


def embed_partition(job: _Job, index: int, rows: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """Run the runner over one partition's rows and save its shard; yields one summary dict."""
    records = [row.asDict() for row in rows]
    manifest = pd.DataFrame(records, columns=[*COLUMNS, POSITION])
    manifest = manifest.sort_values(POSITION).drop(columns=POSITION).reset_index(drop=True)
    start = time.perf_counter()
    extractor, loaded = _worker_extractor(job)
    runner = build_runner(extractor, job.cfg, 0, _task_device(job.cfg))
    original_threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        part = runner(manifest)
    finally:
        torch.set_num_threads(original_threads)
    shard = _save_shard(part.writer, job.out_dir, index, job.metadata)
    yield {
        "partition": index,
        "shard": shard,
        "n": len(manifest),
        "n_ok": len(part.writer.ids),
        "n_cached": part.n_cached,
        "n_read": part.n_read,
        "failures": part.failures,
        "model_loaded": loaded,
        "pid": os.getpid(),
        "seconds": time.perf_counter() - start,
        "mapper_metrics": part.mapper_metrics,
    }


# --- on the driver ------------------------------------------------------------------------------
def _partitions(cfg: SparkConfig, n: int, default_parallelism: int) -> int:
    if isinstance(cfg.partitions, int):
        wanted = cfg.partitions
    else:
        wanted = max(default_parallelism, -(-n // cfg.rows_per_partition))
    return max(1, min(wanted, n))


def _manifest_parquet(manifest: pd.DataFrame, folder: Path) -> Path:
    """The reader's columns of ``manifest`` (str or null) plus the row position, as Parquet."""
    table = pd.DataFrame({POSITION: np.arange(len(manifest), dtype=np.int64)})
    for column in COLUMNS:
        values = manifest[column] if column in manifest.columns else [None] * len(manifest)
        table[column] = [None if v is None or v is pd.NA or v != v else str(v) for v in values]
    path = folder / "manifest.parquet"
    table.to_parquet(path, index=False)
    return path


def spark_extract(
    extractor_dir: Path,
    manifest: pd.DataFrame,
    out_dir: Path,
    cfg: ExtractConfig | None = None,
    spark_cfg: SparkConfig | None = None,
    metadata: Mapping[str, str] | None = None,
) -> SparkExtractResult:
    """Embed ``manifest`` (``image_id``, ``path``, optional ``pre_path``) on Spark.

    ``extractor_dir``: a :func:`~imgsearch.models.backbones.save_extractor` directory every
    executor can read. ``out_dir``: the new shard folder (must not exist or be empty).
    ``spark_cfg`` defaults to ``cfg.spark``. A session already active is used as it is; one
    created here is stopped at the end. Raises ``ValueError`` on a bad manifest or a non-empty
    ``out_dir``, :class:`ConfigError` when pyspark is missing.
    """
    cfg = cfg or ExtractConfig(engine="spark")
    spark_cfg = spark_cfg or from_dict(SparkConfig, cfg.spark)
    require_pyspark()
    check_manifest(manifest)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(
            f"{out_dir} is not empty: the shards of one pass need a folder of their own"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    extractor = load_extractor(Path(extractor_dir))
    t0 = time.perf_counter()
    spark, created = spark_session(spark_cfg)
    startup_s = time.perf_counter() - t0
    try:
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".spark-manifest-") as tmp:
            t1 = time.perf_counter()
            frame = spark.read.parquet(str(_manifest_parquet(manifest, Path(tmp))))
            n_parts = _partitions(spark_cfg, len(manifest), spark.sparkContext.defaultParallelism)
            frame = frame.repartitionByRange(n_parts, POSITION).select(*COLUMNS, POSITION)
            threads = (
                spark_cfg.threads_per_task
                if isinstance(spark_cfg.threads_per_task, int)
                else int(spark.conf.get("spark.task.cpus", "1"))
            )
            job = _Job(
                str(Path(extractor_dir).resolve()),
                fingerprint(extractor),
                cfg,
                threads,
                str(out_dir.resolve()),
                dict(metadata or {}),
            )
            summaries = frame.rdd.mapPartitionsWithIndex(
                lambda i, rows: embed_partition(job, i, rows)
            ).collect()
            seconds = time.perf_counter() - t1
    finally:
        if created:
            spark.stop()
    return _result(out_dir, summaries, len(manifest), n_parts, startup_s, seconds, spark_cfg)


def _result(
    out_dir: Path,
    summaries: list[dict[str, Any]],
    n: int,
    n_parts: int,
    startup_s: float,
    seconds: float,
    spark_cfg: SparkConfig,
) -> SparkExtractResult:
    summaries = sorted(summaries, key=lambda s: s["partition"])
    failures = schema.quarantine_rows([row for s in summaries for row in s["failures"]])
    n_cached = sum(s["n_cached"] for s in summaries)
    first: dict[str, Any] = next(
        (s["mapper_metrics"] for s in summaries if s["mapper_metrics"]), {}
    )
    metrics: dict[str, Any] = {
        "n": float(n),
        "n_ok": float(sum(s["n_ok"] for s in summaries)),
        "n_failed": float(len(failures)),
        "n_from_cache": float(n_cached),
        "n_decoded": float(sum(s["n_read"] for s in summaries) - n_cached),
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else 0.0,
        "spark_startup_s": startup_s,
        "spark_partitions": float(n_parts),
        "spark_shards": float(len(shard_paths(out_dir)) if summaries else 0),
        "spark_model_loads": float(sum(bool(s["model_loaded"]) for s in summaries)),
        "spark_python_workers": float(len({s["pid"] for s in summaries})),
        **first,
    }
    log.info(
        "spark extract (%s): %d images in %d partitions, %d failed, %.1f images/s "
        "(+%.1f s session start)",
        spark_cfg.master,
        n,
        n_parts,
        len(failures),
        metrics["images_per_s"],
        startup_s,
    )
    return SparkExtractResult(shards=out_dir, failures=failures, metrics=metrics)
