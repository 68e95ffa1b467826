"""Batch feature extraction, sequentially: one pass of reader -> mapper -> writer over a manifest.

The parts are public, one module each, so another runner (Spark: one call per partition) can
reuse them unchanged:

- :mod:`imgsearch.embed.reader`: manifest rows -> uint8 batches (preprocess cache or decode);
  a file that cannot be read becomes a failure row (quarantine schema, ``stage="extract"``).
- :mod:`imgsearch.embed.mapper`: the pure model mapping, with the checked bf16 / ``torch.compile``
  decisions made on the first batch.
- :mod:`imgsearch.embed.writer`: rows in manifest order into a preallocated array or ``.npy``
  memmap, written out as an embeddings file (:mod:`imgsearch.embed.files`).
- :mod:`imgsearch.embed.runner`: the :class:`~imgsearch.embed.runner.Runner` that drives them
  over one manifest slice.

:func:`extract` is the sequential runner: the whole manifest is one slice, torch's thread count
and the number of reader processes come from :func:`resolve_parallelism`, and the metrics of the
pass are gathered into an :class:`ExtractResult`. The query path is :mod:`imgsearch.search.query`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from imgsearch import schema
from imgsearch.embed.extras import ExtrasMapper, ExtrasSpec, ExtrasWriter
from imgsearch.embed.mapper import PRECISIONS, Mapper, resolve_device
from imgsearch.embed.reader import ManifestReader
from imgsearch.embed.runner import Runner
from imgsearch.embed.writer import EmbeddingWriter
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor
from imgsearch.models.quantize import QuantizedExtractor

log = logging.getLogger(__name__)

ENGINES = ("local", "spark")
#: ``precision: int8`` (:mod:`imgsearch.evaluate.int8`): quantised, kept only if MAP@R holds.
INT8 = "int8"


@dataclass
class ExtractConfig:
    """How the extract stage runs.

    ``backbone``/``weights`` say which extractor the extract *step* creates
    (:func:`imgsearch.models.backbones.create_extractor`); :func:`extract` itself takes a built one.
    ``num_workers``/``threads``: ``"auto"`` or an int; see :func:`resolve_parallelism`.
    ``device``: ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda[:i]"``.
    ``engine``: ``"local"`` (:func:`extract`, this process) or ``"spark"``
    (:func:`imgsearch.embed.spark_runner.spark_extract`, one runner per partition); ``spark`` holds
    that engine's settings (:class:`imgsearch.embed.spark_runner.SparkConfig`: ``master``, ...).
    ``extras``: which attribute features the extract *step* also writes (``auto``: what
    ``configs/attributes.yaml`` reads; the local engine only), see :mod:`imgsearch.embed.extras`.
    """

    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    batch_size: int = 64
    num_workers: int | str = "auto"
    threads: int | str = "auto"
    channels_last: bool = True
    precision: str = "fp32"
    compile: bool = False
    device: str = "auto"
    engine: str = "local"
    spark: dict[str, Any] = field(default_factory=dict)
    int8: dict[str, Any] = field(default_factory=dict)  # imgsearch.evaluate.int8.Int8Config
    extras: Any = "auto"  # auto | none | [pooled, gram]: imgsearch.embed.extras.ExtrasSpec.resolve

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"ExtractConfig.engine must be one of {ENGINES}, got {self.engine!r}")
        if not isinstance(self.spark, dict):
            raise ConfigError(f"ExtractConfig.spark must be a mapping, got {self.spark!r}")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ConfigError(
                f"ExtractConfig.batch_size must be a positive int, got {self.batch_size!r}"
            )
        for name, low in (("num_workers", 0), ("threads", 1)):
            value = getattr(self, name)
            if value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(
                    f"ExtractConfig.{name} must be 'auto' or an int >= {low}, got {value!r}"
                )
        if self.precision not in (*PRECISIONS, INT8):
            raise ConfigError(
                f"ExtractConfig.precision must be one of {(*PRECISIONS, INT8)}, got {self.precision!r}"
            )
        if self.precision == INT8 and self.engine != "local":
            raise ConfigError("ExtractConfig.precision int8 runs on the local engine only")
        if not isinstance(self.int8, dict):
            raise ConfigError(f"ExtractConfig.int8 must be a mapping, got {self.int8!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ConfigError(f"ExtractConfig.device {self.device!r}: {exc}") from exc


@dataclass
class ExtractResult:
    ids: np.ndarray  # (N_ok,) object array of image_id str, in manifest order
    embeddings: np.ndarray  # (N_ok, D) float32, unit L2 norm
    failures: pd.DataFrame  # quarantine schema, stage="extract"
    metrics: dict[str, Any] = field(default_factory=dict)
    writer: EmbeddingWriter | None = None  # an ExtrasWriter when extras were asked for


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_parallelism(cfg: ExtractConfig, cores: int | None = None) -> tuple[int, int]:
    """``(num_workers, torch threads)`` for ``cfg``; ``auto`` keeps ``workers + threads = cores``.

    ``auto`` workers: none up to 4 cores, then one per 8 cores. Reading is cheap next to the
    forward pass (measured: 1.4 ms of CPU per image to decode + resize a 320x240 JPEG, less from
    the ``pre_path`` cache, vs 34 ms for MobileNetV2 and 141 ms for ResNet-50 per image on one
    thread), so on a small machine a dedicated reader process would idle on a core the forward
    pass needs, and a reader beside a full thread pool oversubscribes the cores. Set
    ``num_workers`` by hand when decoding large originals (no usable ``pre_path``).
    """
    cores = cores or available_cores()
    workers = (
        cfg.num_workers
        if isinstance(cfg.num_workers, int)
        else (0 if cores <= 4 else max(1, cores // 8))
    )
    threads = cfg.threads if isinstance(cfg.threads, int) else max(1, cores - workers)
    return workers, threads


def check_manifest(manifest: pd.DataFrame) -> None:
    """Raise ``ValueError`` when ``image_id`` or ``path`` is missing or an image id repeats."""
    for column in (schema.IMAGE_ID, schema.PATH):
        if column not in manifest.columns:
            raise ValueError(f"manifest has no {column!r} column")
    if manifest[schema.IMAGE_ID].duplicated().any():
        raise ValueError("manifest image_id values are not unique")


def build_runner(
    extractor: Extractor | QuantizedExtractor,
    cfg: ExtractConfig,
    workers: int,
    device: torch.device,
    out: Path | None = None,
    extras: ExtrasSpec | None = None,
) -> Runner:
    """The :class:`Runner` of ``cfg`` around a loaded ``extractor`` (every engine builds it here);
    with ``extras``, its mapper and writer also compute and keep those features
    (:mod:`imgsearch.embed.extras`)."""
    dim = extractor.spec.embedding_dim
    if isinstance(extractor, QuantizedExtractor):  # int8 (ONNX Runtime): its own mapper, no extras
        from imgsearch.embed.quantized import QuantizedMapper

        quantized = extractor
        return Runner(
            reader_builder=lambda: ManifestReader(
                quantized.spec.preprocess, cfg.batch_size, workers
            ),
            mapper_builder=lambda: QuantizedMapper(quantized),
            writer_builder=lambda rows: EmbeddingWriter(rows, dim, out),
        )

    def mapper() -> Mapper:
        options: dict[str, Any] = {
            "precision": cfg.precision,
            "compile": cfg.compile,
            "channels_last": cfg.channels_last,
        }
        if extras is None:
            return Mapper(extractor, device, **options)
        return ExtrasMapper(extractor, device, spec=extras, **options)

    return Runner(
        reader_builder=lambda: ManifestReader(
            extractor.spec.preprocess, cfg.batch_size, workers, pin_memory=device.type == "cuda"
        ),
        mapper_builder=mapper,
        writer_builder=lambda rows: (
            EmbeddingWriter(rows, dim, out) if extras is None else ExtrasWriter(rows, dim, out)
        ),
    )


def extract(
    extractor: Extractor | QuantizedExtractor,
    manifest: pd.DataFrame,
    cfg: ExtractConfig | None = None,
    *,
    out: Path | None = None,
    progress: bool = True,
    extras: ExtrasSpec | None = None,
    make_runner: Callable[[int, torch.device], Runner] | None = None,
) -> ExtractResult:
    """Embed every row of ``manifest`` (needs ``image_id`` and ``path``; uses ``pre_path`` when
    it matches). ``out``: stream embeddings into this ``.npy`` memmap instead of memory (the
    result's ``embeddings`` is then a view of it; its first ``len(ids)`` rows are the valid ones).

    The extractor is restored afterwards (device, memory format, train/eval mode; torch's
    thread count too). ``extras``: also compute those features in the same forward pass
    (``result.writer.save_extras``, :mod:`imgsearch.embed.extras`). Raises ``ValueError`` when a
    required column is missing.

    ``make_runner(workers, device)``: another :class:`Runner` for the pass (default
    :func:`build_runner`; :mod:`imgsearch.embed.trunk` passes one that also keeps the frozen
    trunk's outputs, or one that starts from them; ``extras`` must then be None).
    """
    cfg = cfg or ExtractConfig()
    check_manifest(manifest)
    manifest = manifest.reset_index(drop=True)
    n = len(manifest)
    workers, threads = resolve_parallelism(cfg)
    if make_runner is not None and extras is not None:
        raise ValueError("extract: extras are computed by the default runner only")
    device = resolve_device(cfg.device)
    runner = (
        make_runner(workers, device)
        if make_runner is not None
        else build_runner(extractor, cfg, workers, device, out, extras)
    )
    original_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        with tqdm(total=n, desc="extract", unit="img", disable=not progress) as bar:
            part = runner(manifest, progress=bar.update)
    finally:
        torch.set_num_threads(original_threads)
    seconds = time.perf_counter() - start

    ids, embeddings = part.writer.finish()
    quarantine = schema.quarantine_rows(part.failures)
    metrics: dict[str, Any] = {
        "n": float(n),
        "n_ok": float(len(ids)),
        "n_failed": float(len(quarantine)),
        "n_from_cache": float(part.n_cached),
        "n_decoded": float(part.n_read - part.n_cached),
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else 0.0,
        "batch_size": float(cfg.batch_size),
        "num_workers": float(workers),
        "threads": float(threads),
        "channels_last": float(cfg.channels_last),
        **part.mapper_metrics,
    }
    log.info(
        "extract: %d images, %d failed, %.1f images/s (%d workers, %d threads, %s)",
        n,
        len(quarantine),
        metrics["images_per_s"],
        workers,
        threads,
        metrics["precision_used"],
    )
    return ExtractResult(
        ids=ids, embeddings=embeddings, failures=quarantine, metrics=metrics, writer=part.writer
    )
