"""Attribute features (``pooled``, ``gram``) computed by batch extraction in its own forward pass.

The attribute heads (:mod:`imgsearch.train.attributes`) read, besides the embedding, features of
:mod:`imgsearch.embed.style` that come out of the very forward pass extraction already makes.
With :class:`ExtrasSpec` set, extraction runs :class:`ExtrasMapper` (the
:class:`~imgsearch.embed.mapper.Mapper` whose eager fp32 pass is
:func:`~imgsearch.embed.style.features_of`) and :class:`ExtrasWriter`, and saves an *extras*
folder beside the embeddings:

* ``features.npz``: ``image_id`` (unicode) and one float16 ``(N, D)`` array per kind, rows in
  the embeddings file's order (float16 halves the disk and memory of float32; the heads' val/test
  accuracies do not move beyond noise);
* ``extras.json``: ``kinds``, ``gram_blocks``, ``extractor_fingerprint``, ``n``, ``dims``: what a
  reader checks (:func:`extras_mismatch`) before using them instead of reading the images again.

bf16 or ``torch.compile`` (when the mapper keeps them) change the numbers: the extras are then
not written, and ``reason`` says why. Rows that fail (unreadable, non-finite embedding) get no
extras row, exactly as they get no embedding row: they stay failure rows of extraction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgsearch.embed.mapper import Mapper
from imgsearch.embed.style import EXTRA_KINDS, features_of
from imgsearch.embed.writer import EmbeddingWriter
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor, backbone_blocks

log = logging.getLogger(__name__)

FEATURES_FILE = "features.npz"
META_FILE = "extras.json"
ID_KEY = "image_id"
STORE_DTYPE = np.float16


@dataclass(frozen=True)
class ExtrasSpec:
    """Which extra kinds (among ``pooled``, ``gram``) and which Gram blocks to compute."""

    kinds: tuple[str, ...]
    gram_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(EXTRA_KINDS))
        if unknown:
            raise ConfigError(f"extras {unknown}: only {list(EXTRA_KINDS)} can be extracted")
        if "gram" in self.kinds and not self.gram_blocks:
            raise ConfigError("extras gram needs gram_blocks")

    @classmethod
    def resolve(
        cls, setting: Any, attributes: Mapping[str, Any] | None
    ) -> tuple[ExtrasSpec | None, str]:
        """``(spec or None, why)`` for ``extract.extras``: ``auto`` (the kinds
        ``configs/attributes.yaml`` reads, when ``in_main``), ``none``/``[]``, or a list of kinds.
        Gram blocks always come from ``attributes.gram_blocks`` (one place to set them)."""
        attributes = dict(attributes or {})
        blocks = tuple(int(b) for b in attributes.get("gram_blocks") or ())
        if setting in (None, "none", False) or setting == []:
            return None, "extract.extras is none"
        if setting == "auto":
            if not attributes.get("in_main", True):
                return None, "extras auto: attributes.in_main is false"
            wanted: set[str] = set()
            for spec in (attributes.get("attributes") or {}).values():
                wanted |= set((spec or {}).get("features") or [])
            kinds = tuple(k for k in EXTRA_KINDS if k in wanted)
            if not kinds:
                return None, "extras auto: no head reads pooled or gram features"
            return cls(kinds, blocks if "gram" in kinds else ()), "extras auto"
        if isinstance(setting, str):
            setting = [setting]
        if not isinstance(setting, Sequence):
            raise ConfigError(f"extract.extras must be auto, none or a list, got {setting!r}")
        kinds = tuple(k for k in EXTRA_KINDS if k in set(setting))
        cls(tuple(setting), blocks)  # validates unknown kinds
        return cls(kinds, blocks if "gram" in kinds else ()), "extract.extras"

    def unfit_for(self, extractor: Extractor) -> str:
        """Why ``extractor`` cannot give these extras (``""``: it can): Gram blocks it does not
        have (another backbone than the attribute config was written for)."""
        if not self.gram_blocks:
            return ""
        try:
            n = len(backbone_blocks(extractor))
        except ConfigError as exc:
            return f"gram features: {exc}"
        bad = [b for b in self.gram_blocks if not -n <= b < n]
        return f"gram_blocks {bad}: {extractor.spec.name} has {n} blocks" if bad else ""

    def meta(self) -> dict[str, Any]:
        return {"kinds": list(self.kinds), "gram_blocks": list(self.gram_blocks)}


class ExtrasMapper(Mapper):
    """A :class:`Mapper` that also keeps, in :attr:`extras`, the batch's extra features (one
    forward pass); ``extras`` is ``None`` when bf16/compile are in use (see ``reason``)."""

    def __init__(self, *args: Any, spec: ExtrasSpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.extras: dict[str, np.ndarray] | None = None
        self.reason = ""

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        if not self.decided:  # the checked bf16/compile decisions, on the first batch
            emb = super().__call__(pixels)
            if self.bf16 or self.model is not self.extractor:
                self.reason = "bf16 or torch.compile in use: extras come from fp32 eager only"
                log.warning("extras not written: %s", self.reason)
                self.extras = None
                return emb
            # fp32 eager kept: this first batch runs once more, through features_of
        elif self.reason:
            self.extras = None
            return super().__call__(pixels)
        x = self._input(pixels)
        out = features_of(self.extractor, x, ("embedding", *self.spec.kinds), self.spec.gram_blocks)
        self.extras = {k: out[k] for k in self.spec.kinds}
        return out["embedding"]


class ExtrasWriter(EmbeddingWriter):
    """An :class:`EmbeddingWriter` that also keeps the extras rows, float16, in the same order."""

    def __init__(self, n: int, dim: int, out: Path | None = None) -> None:
        super().__init__(n, dim, out)
        self.extra_ids: list[str] = []
        self.chunks: dict[str, list[np.ndarray]] = {}
        self.reason = ""

    def write_extras(
        self, ids: list[str], extras: Mapping[str, np.ndarray] | None, keep: np.ndarray
    ) -> None:
        """The extras of the rows just written (``keep``: the batch rows that were written)."""
        if extras is None:
            self.reason = self.reason or "the mapper gave no extras"
            return
        for kind, arr in extras.items():
            rows = arr[keep]
            if rows.size and float(np.abs(rows).max()) > float(np.finfo(STORE_DTYPE).max):
                # stored as inf they would poison the heads: the attribute step computes its own
                self.reason = self.reason or f"{kind} values beyond {np.dtype(STORE_DTYPE).name}"
                return
            self.chunks.setdefault(kind, []).append(rows.astype(STORE_DTYPE))
        self.extra_ids.extend(ids)

    def save_extras(self, folder: Path, spec: ExtrasSpec, metadata: Mapping[str, str]) -> Path:
        """Write ``features.npz`` + ``extras.json`` into ``folder``; raises ``ValueError`` when the
        extras do not cover exactly the written embedding rows."""
        if self.reason or self.extra_ids != self.ids:
            raise ValueError(f"extras incomplete: {self.reason or 'ids differ from embeddings'}")
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {
            k: np.concatenate(self.chunks[k])
            if self.chunks.get(k)
            else np.zeros((0, 0), STORE_DTYPE)
            for k in spec.kinds
        }
        payload: dict[str, Any] = {ID_KEY: np.asarray(self.ids, dtype=str), **arrays}
        np.savez(folder / FEATURES_FILE, **payload)
        meta = {
            **spec.meta(),
            "extractor_fingerprint": metadata.get("extractor_fingerprint", ""),
            "n": len(self.ids),
            "dims": {k: int(v.shape[1]) if v.ndim == 2 else 0 for k, v in arrays.items()},
            "dtype": np.dtype(STORE_DTYPE).name,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=1))
        return folder


@dataclass
class Extras:
    ids: list[str]
    features: dict[str, np.ndarray] = field(default_factory=dict)  # float32, (N, D)
    meta: dict[str, Any] = field(default_factory=dict)


def read_meta(folder: Path) -> dict[str, Any]:
    return dict(json.loads((Path(folder) / META_FILE).read_text()))


def extras_mismatch(
    meta: Mapping[str, Any], kinds: Sequence[str], gram_blocks: Sequence[int], fingerprint: str
) -> str:
    """Why saved extras (``meta``) cannot stand for ``kinds`` computed with ``gram_blocks`` by the
    extractor ``fingerprint``; ``""`` when they can."""
    missing = sorted(set(kinds) - set(meta.get("kinds") or []))
    if missing:
        return f"the extract run's extras lack {missing} (it has {meta.get('kinds')})"
    if "gram" in kinds and list(meta.get("gram_blocks") or []) != list(gram_blocks):
        return f"extras gram_blocks {meta.get('gram_blocks')} != {list(gram_blocks)}"
    if fingerprint and meta.get("extractor_fingerprint") != fingerprint:
        return "extras were made by another extractor (fingerprint differs)"
    return ""


def load_extras(folder: Path, kinds: Sequence[str]) -> Extras:
    """``kinds`` of the extras in ``folder``, as float32."""
    folder = Path(folder)
    with np.load(folder / FEATURES_FILE, allow_pickle=False) as data:
        ids = [str(i) for i in data[ID_KEY]]
        feats = {k: data[k].astype(np.float32) for k in kinds}
    return Extras(ids, feats, read_meta(folder))
