"""The re-extraction from the frozen trunk's outputs (:mod:`imgsearch.embed.trunk`): only blocks
``[k:]`` and the head run for the images the baseline extraction kept.

With attribute features asked for (:class:`~imgsearch.embed.extras.ExtrasSpec`), ``pooled`` comes
out of the same partial pass (:class:`RestMapper`, ``extras_kinds``) and ``gram`` from the writing
run's extras (:func:`gram_source`): every Gram block lies inside the frozen part, whose
fingerprint the trunk matched, so the baseline's Gram statistics are this extractor's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from imgsearch import schema
from imgsearch.embed.extract import ExtractConfig, ExtractResult, extract
from imgsearch.embed.extras import (
    META_FILE,
    STORE_DTYPE,
    Extras,
    ExtrasSpec,
    ExtrasWriter,
    extras_mismatch,
    load_extras,
    read_meta,
)
from imgsearch.embed.mapper import Mapper
from imgsearch.embed.reader import Batch, ManifestReader
from imgsearch.embed.runner import Runner
from imgsearch.embed.trunk import CHECK_ROWS, Rest, TrunkConfig, TrunkStore
from imgsearch.embed.writer import EmbeddingWriter
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor, backbone_blocks

log = logging.getLogger(__name__)


def gram_source(
    extras_dir: Path | None, store: TrunkStore, extractor: Extractor, spec: ExtrasSpec
) -> tuple[Extras | None, str]:
    """``(the Gram features, "")`` of the extras the trunk's own run wrote (``extras_dir``), or
    ``(None, why not)``: they must hold ``gram`` over ``spec.gram_blocks``, every one of those
    blocks must lie inside the trunk (``< store.blocks``), and ``store`` must match
    ``extractor``'s frozen part."""
    n = len(backbone_blocks(extractor))
    late = [b for b in spec.gram_blocks if (b % n if -n <= b < n else b) >= store.blocks]
    if late:
        return None, f"gram blocks {late} lie after the trunk's {store.blocks} blocks"
    if extras_dir is None or not (Path(extras_dir) / META_FILE).is_file():
        return None, "the trunk's run wrote no extras"
    # the writing run's fingerprint is the baseline's: the trunk match below stands for it
    why = extras_mismatch(read_meta(Path(extras_dir)), ["gram"], spec.gram_blocks, "")
    if why:
        return None, why
    if not store.matches(extractor):
        return None, "the trunk was made by another frozen part (fingerprint)"
    return load_extras(Path(extras_dir), ["gram"]), ""


def attach_gram(writer: ExtrasWriter, gram: Extras) -> None:
    """Put ``gram``'s rows for the writer's ids (in its order) beside the ``pooled`` rows the pass
    kept; a missing id leaves the writer incomplete (``reason``), so nothing half is saved."""
    where = {image_id: row for row, image_id in enumerate(gram.ids)}
    missing = [i for i in writer.extra_ids if i not in where]
    if missing:
        writer.reason = writer.reason or f"{len(missing)} rows lack the baseline's gram features"
        return
    rows = gram.features["gram"][[where[i] for i in writer.extra_ids]]
    writer.chunks["gram"] = [rows.astype(STORE_DTYPE)]


@dataclass
class TrunkReader:
    """Reads a manifest slice's rows from a :class:`TrunkStore` (every row must be in it) as
    :class:`~imgsearch.embed.reader.Batch` es whose ``pixels`` are trunk outputs."""

    store: TrunkStore
    batch_size: int = 64

    def __call__(self, manifest: pd.DataFrame) -> Iterable[Batch]:
        positions = self.store.positions(manifest)
        if (positions < 0).any():
            raise ValueError("TrunkReader: rows missing from the trunk artifact")
        for start in range(0, len(manifest), self.batch_size):
            pos = positions[start : start + self.batch_size]
            indices = list(range(start, start + len(pos)))
            yield Batch(indices, self.store.rows(pos), len(pos), [])


class RestMapper(Mapper):
    """Trunk outputs -> embeddings through :class:`Rest` (fp32, eager). ``extras_kinds`` (not
    None): :attr:`extras` holds the batch's ``pooled`` features when asked for (``gram`` is
    attached afterwards, :func:`attach_gram`)."""

    def __init__(
        self,
        extractor: Extractor,
        device: torch.device,
        blocks: int,
        extras_kinds: Sequence[str] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(extractor, device, **kw)
        self.rest = Rest(extractor, blocks)
        self.extras_kinds = extras_kinds
        self.extras: dict[str, np.ndarray] | None = None

    def __call__(self, rows: torch.Tensor) -> np.ndarray:
        x = rows.to(self.device).float().contiguous(memory_format=self.memory_format)
        with torch.inference_mode():
            pooled, emb = self.rest.parts(x)
        if self.extras_kinds is not None:
            keep = "pooled" in self.extras_kinds
            self.extras = {"pooled": pooled.cpu().numpy()} if keep else {}
        return emb.float().cpu().numpy()


def extract_from_trunk(
    extractor: Extractor,
    manifest: pd.DataFrame,
    cfg: ExtractConfig,
    store: TrunkStore,
    *,
    out: Path | None = None,
    progress: bool = True,
    min_cosine: float = TrunkConfig.min_cosine,
    extras: ExtrasSpec | None = None,
    gram: Extras | None = None,
) -> ExtractResult:
    """Embed ``manifest`` with ``extractor``, running only blocks ``[store.blocks:]`` (and the
    head) for the rows ``store`` holds; the other rows take the full pass (and fail as they
    would there). Rows come back in manifest order, as from :func:`extract`.

    :data:`CHECK_ROWS` cached rows also take the full pass; when an embedding made from the
    cached outputs is further than ``min_cosine`` from it, everything takes the full pass.
    ``extras``: the attribute features too (``result.writer``, an
    :class:`~imgsearch.embed.extras.ExtrasWriter`): ``pooled`` from this pass, ``gram`` from
    ``gram`` (:func:`gram_source`, required when ``extras`` asks for it); every full-pass
    fallback computes them all. Raises :class:`ConfigError` when ``store`` was not made by
    ``extractor``'s frozen part, or ``extras`` asks for gram without ``gram``.
    """
    if not store.matches(extractor):
        raise ConfigError("the trunk artifact was made by another frozen part (fingerprint)")
    manifest = manifest.reset_index(drop=True)
    start = time.perf_counter()
    positions = store.positions(manifest)
    cached, rest = manifest[positions >= 0], manifest[positions < 0]
    tmp = out.parent if out is not None else None
    if extras is not None and "gram" in extras.kinds and gram is None:
        raise ConfigError("extras gram from the trunk needs the writing run's gram features")

    def make_runner(workers: int, device: torch.device) -> Runner:
        dim = extractor.spec.embedding_dim
        return Runner(
            # any reader of Batch es will do; the Runner is annotated with the usual one
            reader_builder=lambda: cast(ManifestReader, TrunkReader(store, cfg.batch_size)),
            mapper_builder=lambda: RestMapper(
                extractor,
                device,
                store.blocks,
                extras_kinds=extras.kinds if extras is not None else None,
                channels_last=cfg.channels_last,
            ),
            writer_builder=lambda n: (EmbeddingWriter if extras is None else ExtrasWriter)(
                n, dim, tmp / "from_trunk.npy" if tmp else None
            ),
        )

    parts: list[ExtractResult] = []
    check = float("nan")
    if len(cached):
        top = extract(extractor, cached, cfg, progress=progress, make_runner=make_runner)
        check = _check_rows(extractor, cached.head(CHECK_ROWS), top, cfg)
        if not check >= min_cosine:
            log.warning(
                "embeddings from the trunk artifact differ from the full pass (min cosine %.6f "
                "< %.4f): running the full pass for every row",
                check,
                min_cosine,
            )
            result = extract(extractor, manifest, cfg, out=out, progress=progress, extras=extras)
            result.metrics.update({"trunk_check_min_cosine": check, "n_from_trunk": 0.0})
            return result
        if gram is not None and isinstance(top.writer, ExtrasWriter):
            attach_gram(top.writer, gram)
        parts.append(top)
    if len(rest):
        log.info("%d rows not in the trunk artifact: full pass for them", len(rest))
        parts.append(
            extract(
                extractor,
                rest,
                cfg,
                progress=progress,
                out=tmp / "not_in_trunk.npy" if tmp else None,
                extras=extras,
            )
        )
    result = _merge(manifest, parts, extractor.spec.embedding_dim, out, extras is not None)
    seconds = time.perf_counter() - start
    result.metrics.update(
        {
            "n": float(len(manifest)),
            "n_from_trunk": float(len(cached)),
            "n_not_in_trunk": float(len(rest)),
            "trunk_check_min_cosine": check,
            "seconds": seconds,
            "images_per_s": len(manifest) / seconds if seconds > 0 else 0.0,
        }
    )
    return result


def _check_rows(
    extractor: Extractor, rows: pd.DataFrame, top: ExtractResult, cfg: ExtractConfig
) -> float:
    """Smallest cosine between the full pass and ``top``'s embeddings on ``rows``."""
    full = extract(extractor, rows, cfg, progress=False)
    index = {i: r for r, i in enumerate(top.ids)}
    pairs = [(r, index[i]) for r, i in enumerate(full.ids) if i in index]
    if not pairs:
        return float("nan")
    a = full.embeddings[[p for p, _ in pairs]]
    b = top.embeddings[[q for _, q in pairs]]
    return float((a * b).sum(axis=1).min())


def _extras_rows(writer: EmbeddingWriter | None) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """``(image_id -> row, kind -> rows)`` of an :class:`ExtrasWriter`'s complete extras;
    raises ``ValueError`` (with the reason) when it has none."""
    if not isinstance(writer, ExtrasWriter) or writer.reason:
        reason = writer.reason if isinstance(writer, ExtrasWriter) else "no extras writer"
        raise ValueError(reason or "no extras")
    arrays = {k: np.concatenate(v) for k, v in writer.chunks.items() if v}
    return {i: r for r, i in enumerate(writer.extra_ids)}, arrays


def _merge(
    manifest: pd.DataFrame,
    parts: list[ExtractResult],
    dim: int,
    out: Path | None,
    with_extras: bool = False,
) -> ExtractResult:
    """One result in manifest order from results over disjoint slices of it; ``with_extras``:
    their extras too (``result.writer``, incomplete with the reason when a part lacks them)."""
    where = {i: (k, r) for k, part in enumerate(parts) for r, i in enumerate(part.ids)}
    order = [str(i) for i in manifest[schema.IMAGE_ID] if str(i) in where]
    writer = (
        ExtrasWriter(len(order), dim, out) if with_extras else EmbeddingWriter(len(order), dim, out)
    )
    extras: list[tuple[dict[str, int], dict[str, np.ndarray]]] = []
    if with_extras:
        try:
            extras = [_extras_rows(p.writer) for p in parts]
        except ValueError as exc:
            cast(ExtrasWriter, writer).reason = str(exc)
    chunk = 4096
    for s in range(0, len(order), chunk):
        ids = order[s : s + chunk]
        if not ids:
            continue
        writer.write(ids, np.stack([parts[where[i][0]].embeddings[where[i][1]] for i in ids]))
        if extras:
            kinds = extras[0][1].keys()
            rows = {
                kind: np.stack(
                    [extras[where[i][0]][1][kind][extras[where[i][0]][0][i]] for i in ids]
                )
                for kind in kinds
            }
            cast(ExtrasWriter, writer).write_extras(ids, rows, np.ones(len(ids), dtype=bool))
    ids_arr, emb = writer.finish()
    failures = [p.failures for p in parts if len(p.failures)]
    metrics: dict[str, Any] = {}
    for part in reversed(parts):  # the first part's (the trunk pass's) settings win
        metrics.update(part.metrics)
    metrics["n_ok"] = float(len(ids_arr))
    metrics["n_failed"] = float(sum(len(f) for f in failures))
    quarantine = pd.concat(failures, ignore_index=True) if failures else schema.empty_quarantine()
    return ExtractResult(
        ids=ids_arr, embeddings=emb, failures=quarantine, metrics=metrics, writer=writer
    )
