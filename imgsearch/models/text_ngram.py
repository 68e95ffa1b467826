"""``ngram``: character n-gram features learned from the catalog's own texts.

For languages and vocabularies no pretrained encoder here covers (Russian in the demo, product
codes, brand names). Texts are normalised (Unicode NFKC, case folding, ``ё`` -> ``е``), then
scikit-learn's ``TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)``
(n-grams inside word boundaries, padded with a space) and ``TruncatedSVD`` (LSA) reduce them to
``dim`` dimensions, and rows are L2-normalised.

Fit on train texts only (:meth:`NgramTower.fit`): the vocabulary, the idf weights and the SVD
components are then part of the model, and val/test texts are only encoded. A text made only
of n-grams never seen in training encodes to an all-zero row (similarity 0 to everything).

Saved as ``tower.json`` (parameters) + ``ngram.npz`` (vocabulary terms in index order, idf,
SVD components), read back with ``np.load(allow_pickle=False)``: no pickle is ever loaded.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer

from imgsearch.errors import ConfigError
from imgsearch.models.text_base import (
    check_texts,
    hash_arrays,
    l2_normalize,
    read_meta,
    write_meta,
)

log = logging.getLogger(__name__)

KIND = "ngram"
ARRAYS_FILE = "ngram.npz"


def normalise_text(text: str) -> str:
    """NFKC, case folding and ``ё`` -> ``е`` (Russian writes both for the same word)."""
    return unicodedata.normalize("NFKC", text).casefold().replace("ё", "е")


@dataclass(frozen=True)
class NgramParams:
    """``dim``: output size (SVD components); ``min_n``/``max_n``: n-gram lengths;
    ``min_df``: an n-gram must occur in at least this many training texts;
    ``max_features``: keep the most frequent n-grams only; ``seed``: of the randomised SVD."""

    dim: int = 256
    min_n: int = 2
    max_n: int = 4
    min_df: int = 1
    max_features: int | None = 200_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or not 1 <= self.min_n <= self.max_n or self.min_df < 1:
            raise ConfigError(f"ngram tower: bad parameters {asdict(self)}")


class NgramTower:
    """Character n-gram TF-IDF + LSA text tower (scikit-learn's fit/transform convention:
    learned attributes end in ``_`` and exist only after :meth:`fit`)."""

    def __init__(self, **params: Any) -> None:
        self.params = NgramParams(**params)
        self.vectorizer_: TfidfVectorizer | None = None
        self.components_: np.ndarray | None = None

    @property
    def name(self) -> str:
        return KIND

    @property
    def dim(self) -> int:
        return self.params.dim

    def _vectorizer(self, vocabulary: dict[str, int] | None = None) -> TfidfVectorizer:
        return TfidfVectorizer(
            analyzer="char_wb",
            ngram_range=(self.params.min_n, self.params.max_n),
            min_df=self.params.min_df,
            max_features=self.params.max_features,
            sublinear_tf=True,
            lowercase=False,  # normalise_text already case-folds (better than lower() for ß, ς)
            dtype=np.float32,
            vocabulary=vocabulary,
        )

    def fit(self, texts: Sequence[str]) -> NgramTower:
        """Learn the n-gram vocabulary, idf and SVD from ``texts`` (train texts only).

        An SVD has at most ``min(texts, n-grams) - 1`` useful dimensions: a smaller catalog than
        ``dim`` asks for (a demo with ``--limit 40``) gets that many, with a warning, and the
        tower's ``dim`` (saved with it) says so. Raises :class:`ConfigError` when that leaves
        fewer than 2 (lower ``dim``, or give more text)."""
        texts = [normalise_text(t) for t in check_texts(texts, "ngram.fit")]
        vectorizer = self._vectorizer()
        x = vectorizer.fit_transform(texts)
        n_features = x.shape[1]
        dim = min(self.params.dim, n_features - 1, len(texts) - 1)
        if dim < 2:
            raise ConfigError(
                f"ngram tower: {len(texts)} texts give {n_features} distinct n-grams, too few "
                f"for dim={self.params.dim}; lower dim or fit on more text"
            )
        if dim < self.params.dim:
            log.warning(
                "ngram tower: %d texts with %d distinct n-grams support %d dims, not dim=%d",
                len(texts),
                n_features,
                dim,
                self.params.dim,
            )
            self.params = replace(self.params, dim=dim)
        svd = TruncatedSVD(n_components=self.dim, random_state=self.params.seed)
        svd.fit(x)
        self.vectorizer_ = vectorizer
        self.components_ = svd.components_.astype(np.float32)
        log.info(
            "ngram tower fitted on %d texts: %d n-grams -> %d dims, explained variance %.3f",
            len(texts),
            n_features,
            self.dim,
            float(svd.explained_variance_ratio_.sum()),
        )
        return self

    def _fitted(self) -> tuple[TfidfVectorizer, np.ndarray]:
        if self.vectorizer_ is None or self.components_ is None:
            raise ConfigError(
                "ngram tower is not fitted: call fit(train_texts) or load a saved one"
            )
        return self.vectorizer_, self.components_

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectorizer, components = self._fitted()
        texts = [normalise_text(t) for t in check_texts(texts, "ngram.encode")]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = vectorizer.transform(texts)
        return l2_normalize(np.asarray(x @ components.T))

    def _arrays(self) -> dict[str, np.ndarray]:
        vectorizer, components = self._fitted()
        terms = np.empty(len(vectorizer.vocabulary_), dtype=object)
        for term, index in vectorizer.vocabulary_.items():
            terms[index] = term
        return {
            "terms": terms.astype(str),  # fixed-width unicode: loads without pickle
            "idf": np.asarray(vectorizer.idf_, dtype=np.float32),
            "components": components,
        }

    def fingerprint(self) -> str:
        return hash_arrays({"kind": KIND, **asdict(self.params)}, self._arrays())

    def save(self, directory: Path) -> Path:
        arrays = self._arrays()
        directory = write_meta(Path(directory), KIND, asdict(self.params), self.fingerprint())
        np.savez(
            directory / ARRAYS_FILE,
            terms=arrays["terms"],
            idf=arrays["idf"],
            components=arrays["components"],
        )
        return directory

    @classmethod
    def load(cls, directory: Path) -> NgramTower:
        meta = read_meta(directory)
        if meta["kind"] != KIND:
            raise ConfigError(f"{directory} holds a {meta['kind']!r} tower, not {KIND!r}")
        tower = cls(**meta["params"])
        try:
            with np.load(Path(directory) / ARRAYS_FILE, allow_pickle=False) as data:
                terms, idf, components = data["terms"], data["idf"], data["components"]
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(
                f"{directory / ARRAYS_FILE}: not a saved ngram tower ({exc})"
            ) from exc
        if components.shape != (tower.dim, len(terms)) or idf.shape != (len(terms),):
            raise ConfigError(
                f"{directory}: arrays do not fit (terms {terms.shape}, idf {idf.shape}, "
                f"components {components.shape}, dim {tower.dim})"
            )
        vectorizer = tower._vectorizer(vocabulary={str(t): i for i, t in enumerate(terms)})
        vectorizer.idf_ = idf
        tower.vectorizer_ = vectorizer
        tower.components_ = components.astype(np.float32)
        return tower
