"""The frozen trunk's outputs, computed once: by the baseline extraction, for the whole catalog.

Fine-tuning freezes the first ``k`` blocks of the backbone (``finetune.freeze_blocks``) and keeps
their BatchNorm statistics (``freeze_bn``), so blocks ``[:k]`` of the baseline extractor and of
the fine-tuned one are the same function. Their outputs are computed three times in the demo
pipeline: by the baseline extraction (inside the full forward pass), by fine-tuning (for its
train and val images, ``cache_frozen``) and by the re-extraction with the fine-tuned extractor.
This module keeps them from the first pass and lets the other two run only blocks ``[k:]``.

What is kept, and how it travels: the baseline extract run writes an artifact ``trunk/``
(:data:`TRUNK_ARTIFACT`) holding ``trunk.npy`` (``(N, C, h, w)`` in ``dtype``, one row per image
that was read, written into a memmap as the pass goes, so memory stays flat however large the
catalog), ``ids.parquet`` (``image_id`` and, when the manifest has it, the image's ``sha256``, per
row) and ``trunk.json`` (the :func:`trunk_fingerprint`, block count, dtype, shape). A later stage
is handed ``runs:/<extract run>/trunk`` like any other input (MLflow returns a local artifact store's
files in place, so nothing is copied; a remote store downloads it once). Reuse is decided per
stage and per row:

- the consumer computes :func:`trunk_fingerprint` of *its* extractor (the backbone name, the
  preprocessing, the block count, the dtype and every tensor of blocks ``[:k]``, BatchNorm
  buffers included) and uses the artifact only when it is equal: another backbone, other
  weights, another input size or freeze count never reuses stale outputs;
- a row is reused only when its ``image_id`` is in the artifact with the same ``sha256`` (when
  both sides know it); every other row (an image that failed in the baseline pass, a new one, a
  changed file) goes through the full network as before, so a failure is still a failure row.

Why an artifact, not a content-addressed folder under ``$IMGSEARCH_HOME`` like the preprocessed
uint8 cache: the outputs belong to one extractor's frozen part, are produced by one run and are
what two later runs consume, which is the run-artifact contract every other stage hand-over uses
(lineage in the UI, works with a remote artifact store, deleted with its run); the per-row
``sha256`` keeps the content check a cache folder would give.

Numbers (MobileNetV2, 224 px, ``k = 13``): block 12's output is 96x14x14 per image, 37 KB in
float16. The writer runs inside the extraction's forward pass (a forward hook on block ``k-1``),
so the baseline extraction costs no extra network time, only the write.

The attribute features (:mod:`imgsearch.embed.extras`) ride along: the writing pass computes
them in the same forward pass (:class:`CapturingExtrasMapper`); the re-extraction
(:mod:`imgsearch.embed.trunk_read`) computes ``pooled`` in blocks ``[k:]`` and takes ``gram``
from the writing run's extras when every Gram block lies inside the frozen part (then the two
extractors' Gram statistics are the same function of the image).

Spark runs keep doing full passes (nothing here is used by :mod:`imgsearch.embed.spark_runner`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from imgsearch import schema
from imgsearch.embed.extract import ExtractConfig, ExtractResult, build_runner, extract
from imgsearch.embed.extras import ExtrasMapper, ExtrasSpec
from imgsearch.embed.mapper import Mapper
from imgsearch.embed.runner import (
    PartitionResult,
    Runner,
    _map_and_write,
    _record_failures,
)
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import REGISTRY, Extractor, backbone_blocks, embed_pooled

log = logging.getLogger(__name__)

TRUNK_ARTIFACT = "trunk"
ARRAY_FILE = "trunk.npy"
IDS_FILE = "ids.parquet"
META_FILE = "trunk.json"
TRUNK_DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: How many cached rows the re-extraction also runs through the whole network, as a check.
CHECK_ROWS = 16


@dataclass
class TrunkConfig:
    """``configs/trunk.yaml``. ``write``: the baseline extraction writes the trunk's outputs when
    fine-tuning will cache its frozen blocks. ``reuse``: fine-tuning and re-extraction take them
    from that run when the fingerprints match. ``min_cosine``: the re-extraction runs
    :data:`CHECK_ROWS` cached images through the whole network too and falls back to the full
    pass when any embedding is further than this from the one made from the cached outputs."""

    write: bool = True
    reuse: bool = True
    min_cosine: float = 0.999


# --- the frozen part --------------------------------------------------------------------------------


def check_splittable(extractor: Extractor, blocks: int) -> None:
    """:class:`ConfigError` unless ``extractor``'s body is its blocks then average pooling and
    ``0 < blocks < block count`` (the only case where the trunk's outputs are enough)."""
    entry = REGISTRY.get(extractor.spec.name)
    n = len(backbone_blocks(extractor)) if entry is not None else 0
    if entry is None or not entry.pooled_blocks or not 0 < blocks < n:
        raise ConfigError(
            f"trunk outputs need a backbone that is its blocks then pooling and 0 < k < its "
            f"block count; {extractor.spec.name!r} with k={blocks} does not qualify"
        )


def trunk_fingerprint(extractor: Extractor, blocks: int, dtype: str) -> str:
    """sha256 (hex) of what decides the trunk's outputs: backbone name, preprocessing, block
    count, stored dtype and every state-dict tensor of blocks ``[:blocks]`` (weights and
    BatchNorm buffers), like :func:`imgsearch.models.backbones.fingerprint` for a prefix."""
    if dtype not in TRUNK_DTYPES:
        raise ConfigError(f"trunk dtype must be one of {sorted(TRUNK_DTYPES)}, got {dtype!r}")
    digest = hashlib.sha256()
    head = {
        "backbone": extractor.spec.name,
        "preprocess": extractor.spec.preprocess.to_dict(),
        "blocks": int(blocks),
        "dtype": dtype,
    }
    digest.update(json.dumps(head, sort_keys=True, separators=(",", ":")).encode())
    for i, block in enumerate(backbone_blocks(extractor)[:blocks]):
        for key, value in sorted(block.state_dict().items()):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"\0{i}.{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.view(torch.int16)
            digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
    return digest.hexdigest()


class Rest(nn.Module):
    """Blocks ``[k:]`` of ``extractor`` then what :class:`Extractor` does after its body (average
    pooling, L2 normalisation, the head if any, normalised again): ``rest(trunk(x)) ==
    extractor(x)``. Shares its modules with ``extractor``."""

    def __init__(self, extractor: Extractor, blocks: int) -> None:
        super().__init__()
        check_splittable(extractor, blocks)
        self.blocks = nn.Sequential(*backbone_blocks(extractor)[blocks:])
        self.head = extractor.head
        self.backbone_weight = extractor.spec.backbone_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts(x)[1]

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled, embedding)``: the normalised pooled backbone features (the ``pooled``
        extra, as :func:`imgsearch.embed.style.features_of` gives it) and the embedding."""
        features = self.blocks(x)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)
        pooled = nn.functional.normalize(pooled.float(), dim=1)
        return pooled, embed_pooled(pooled, self.head, self.backbone_weight)


# --- the artifact ----------------------------------------------------------------------------------


class TrunkWriter:
    """Appends trunk rows in manifest order into an ``.npy`` memmap of ``n`` preallocated rows
    (opened on the first batch, when the row shape is known); :meth:`finish` writes the ids and
    ``trunk.json`` beside it."""

    def __init__(self, directory: Path, n: int, dtype: str, meta: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.n, self.dtype, self.meta = n, dtype, dict(meta)
        self.array: np.memmap | None = None
        self.ids: list[str] = []
        self.shas: list[str | None] = []

    def write(self, ids: Sequence[str], shas: Sequence[str | None], rows: torch.Tensor) -> None:
        data = rows.to(TRUNK_DTYPES[self.dtype]).contiguous().numpy()
        if self.array is None:
            self.array = np.lib.format.open_memmap(
                self.directory / ARRAY_FILE,
                mode="w+",
                dtype=data.dtype,
                shape=(self.n, *data.shape[1:]),
            )
        start = len(self.ids)
        self.array[start : start + len(ids)] = data
        self.ids.extend(ids)
        self.shas.extend(shas)

    def finish(self) -> Path:
        """Flush and write ``ids.parquet`` and ``trunk.json``; returns the directory."""
        shape: list[int] = []
        if self.array is not None:
            self.array.flush()
            shape = list(self.array.shape[1:])
            del self.array
            self.array = None
        else:  # nothing was readable: an empty array, so the artifact is still well-formed
            np.save(self.directory / ARRAY_FILE, np.zeros((0,), dtype=np.float16))
        pd.DataFrame({schema.IMAGE_ID: self.ids, schema.SHA256: self.shas}).to_parquet(
            self.directory / IDS_FILE, index=False
        )
        meta = {**self.meta, "dtype": self.dtype, "shape": shape, "n": len(self.ids)}
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        return self.directory


class TrunkStore:
    """A written ``trunk/`` directory, read through a memmap (rows are read when asked for)."""

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        try:
            self.meta: dict[str, Any] = json.loads((directory / META_FILE).read_text())
            ids = pd.read_parquet(directory / IDS_FILE)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{directory} is not a trunk artifact: {exc}") from exc
        self.directory = directory
        self.n = int(self.meta["n"])
        self.array = np.load(directory / ARRAY_FILE, mmap_mode="r") if self.n else None
        self._row = {str(i): r for r, i in enumerate(ids[schema.IMAGE_ID])}
        self._sha = [s if isinstance(s, str) and s else None for s in ids[schema.SHA256]]

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def blocks(self) -> int:
        return int(self.meta["blocks"])

    @property
    def dtype(self) -> str:
        return str(self.meta["dtype"])

    def matches(self, extractor: Extractor) -> bool:
        """Whether ``extractor``'s blocks ``[:blocks]`` (and preprocessing) made these outputs."""
        try:
            return trunk_fingerprint(extractor, self.blocks, self.dtype) == self.fingerprint
        except ConfigError:
            return False

    def positions(self, manifest: pd.DataFrame) -> np.ndarray:
        """Row of each manifest row in the store, -1 when absent or its ``sha256`` differs."""
        shas = (
            manifest[schema.SHA256].tolist()
            if schema.SHA256 in manifest.columns
            else [None] * len(manifest)
        )
        out = np.full(len(manifest), -1, dtype=np.int64)
        for j, (image_id, sha) in enumerate(zip(manifest[schema.IMAGE_ID], shas, strict=True)):
            r = self._row.get(str(image_id), -1)
            if r >= 0:
                stored = self._sha[r]
                if stored and isinstance(sha, str) and sha and sha != stored:
                    continue  # the file changed since: recompute
                out[j] = r
        return out

    def rows(self, positions: np.ndarray) -> torch.Tensor:
        """``(len(positions), C, h, w)`` in the stored dtype (a copy, read from the memmap)."""
        if self.array is None:
            raise IndexError("the trunk artifact holds no rows")
        return torch.from_numpy(np.ascontiguousarray(self.array[np.asarray(positions)]))


def open_trunk(directory: Path) -> TrunkStore:
    return TrunkStore(directory)


# --- writing: the baseline extraction -----------------------------------------------------------------


class CapturingMapper(Mapper):
    """A :class:`Mapper` that also keeps block ``k-1``'s output of each batch (``captured``),
    taken by a forward hook during the same forward pass. fp32 eager only: a bf16 or compiled
    pass would change (or hide) what the hook sees."""

    def __init__(self, extractor: Extractor, device: torch.device, blocks: int, **kw: Any) -> None:
        super().__init__(extractor, device, **kw)
        if self.precision != "fp32" or self.compile:
            raise ConfigError("writing trunk outputs needs extract.precision fp32, compile off")
        check_splittable(extractor, blocks)
        self.block = backbone_blocks(extractor)[blocks - 1]
        self.captured: torch.Tensor | None = None

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.captured = output.detach()

    @contextmanager
    def session(self) -> Iterator[None]:
        handle = self.block.register_forward_hook(self._keep)
        try:
            with super().session():
                yield
        finally:
            handle.remove()

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        self.captured = None
        out = super().__call__(pixels)
        if self.captured is None or len(self.captured) != len(pixels):
            raise RuntimeError("the trunk hook did not see this batch")
        return out


class CapturingExtrasMapper(CapturingMapper, ExtrasMapper):
    """A :class:`CapturingMapper` that also keeps the batch's attribute features
    (:class:`~imgsearch.embed.extras.ExtrasMapper`, ``spec=``): trunk outputs, embeddings and
    extras from one forward pass (the trunk hook sees the pass that computes the extras)."""


@dataclass
class TrunkRunner(Runner):
    """:class:`Runner` whose mapper is a :class:`CapturingMapper`: every row that was read gets
    its trunk output written too (``trunk_writer``), in manifest order."""

    trunk_writer_builder: Callable[[int], TrunkWriter] | None = None
    trunk_writer: TrunkWriter | None = None

    def __call__(
        self, manifest: pd.DataFrame, progress: Callable[[int], object] | None = None
    ) -> PartitionResult:
        assert self.trunk_writer_builder is not None
        manifest = manifest.reset_index(drop=True)
        reader, mapper = self.reader_builder(), self.mapper_builder()
        assert isinstance(mapper, CapturingMapper)
        result = PartitionResult(self.writer_builder(len(manifest)))
        self.trunk_writer = self.trunk_writer_builder(len(manifest))
        image_ids = manifest[schema.IMAGE_ID].astype(str).tolist()
        shas = _shas(manifest)
        with mapper.session():
            for batch in reader(manifest):
                _record_failures(manifest, image_ids, batch, result)
                if batch.indices:
                    _map_and_write(manifest, image_ids, batch, mapper, result)
                    assert mapper.captured is not None
                    self.trunk_writer.write(
                        [image_ids[i] for i in batch.indices],
                        [shas[i] for i in batch.indices],
                        mapper.captured.cpu(),
                    )
                if progress is not None:
                    progress(len(batch.indices) + len(batch.failed))
        result.mapper_metrics = dict(mapper.metrics)
        return result


def _shas(manifest: pd.DataFrame) -> list[str | None]:
    if schema.SHA256 not in manifest.columns:
        return [None] * len(manifest)
    return [s if isinstance(s, str) and s else None for s in manifest[schema.SHA256]]


def extract_writing_trunk(
    extractor: Extractor,
    manifest: pd.DataFrame,
    cfg: ExtractConfig,
    directory: Path,
    blocks: int,
    dtype: str,
    *,
    out: Path | None = None,
    progress: bool = True,
    extras: ExtrasSpec | None = None,
) -> tuple[ExtractResult, Path]:
    """:func:`imgsearch.embed.extract.extract`, also writing blocks ``[:blocks]``' outputs of
    every readable row to ``directory`` (see the module docstring). The embeddings are those of
    the plain pass: the same forward pass, observed. ``extras``: the attribute features too
    (``result.writer`` is then an :class:`~imgsearch.embed.extras.ExtrasWriter`). Raises
    :class:`ConfigError` when the backbone cannot be split there or the pass is not fp32 eager."""
    check_splittable(extractor, blocks)
    meta = {
        "fingerprint": trunk_fingerprint(extractor, blocks, dtype),
        "blocks": blocks,
        "backbone": extractor.spec.name,
        "preprocess": extractor.spec.preprocess.to_dict(),
    }
    holder: dict[str, TrunkRunner] = {}

    def make_runner(workers: int, device: torch.device) -> Runner:
        plain = build_runner(extractor, cfg, workers, device, out, extras)
        options: dict[str, Any] = {
            "precision": cfg.precision,
            "compile": cfg.compile,
            "channels_last": cfg.channels_last,
        }
        runner = TrunkRunner(
            reader_builder=plain.reader_builder,
            mapper_builder=lambda: (
                CapturingMapper(extractor, device, blocks, **options)
                if extras is None
                else CapturingExtrasMapper(extractor, device, blocks, spec=extras, **options)
            ),
            writer_builder=plain.writer_builder,
            trunk_writer_builder=lambda n: TrunkWriter(directory, n, dtype, meta),
        )
        holder["runner"] = runner
        return runner

    result = extract(extractor, manifest, cfg, out=out, progress=progress, make_runner=make_runner)
    writer = holder["runner"].trunk_writer
    assert writer is not None
    path = writer.finish()
    result.metrics["trunk_rows_written"] = float(len(writer.ids))
    return result, path
