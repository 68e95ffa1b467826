"""Predicted attributes of query images: the extractor's features, then each attribute head.

:class:`AttributePredictor` pairs saved heads (:func:`imgsearch.models.attribute_heads.load_heads`)
with the extractor they were trained on; any other extractor is refused
(:class:`~imgsearch.errors.ExtractorMismatchError`), since a head reads numbers only that
extractor makes. Features are computed the way training computed them
(:func:`imgsearch.embed.style.image_features`: one forward pass for ``embedding``, ``pooled``
and ``gram``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from imgsearch.embed.style import image_features
from imgsearch.errors import ExtractorMismatchError
from imgsearch.models.attribute_heads import AttributeHead, head_input, load_heads
from imgsearch.models.backbones import Extractor, fingerprint

#: columns of :meth:`AttributePredictor.predict`
ATTRIBUTE_COLUMNS = ("row", "attribute", "rank", "label", "probability")


def check_extractor(meta: dict[str, Any], extractor_fp: str) -> None:
    """Refuse heads trained on another extractor's features, naming both fingerprints."""
    trained = str(meta.get("extractor_fingerprint") or "")
    if trained != extractor_fp:
        raise ExtractorMismatchError(
            f"the attribute heads were trained on extractor {trained[:12] or '(unknown)'}, "
            f"this extractor is {extractor_fp[:12]}: re-run the attributes step on an extract "
            "run of this extractor"
        )


@dataclass
class AttributePredictor:
    extractor: Extractor
    heads: dict[str, AttributeHead]
    meta: dict[str, Any]

    @classmethod
    def load(
        cls, heads_dir: Path, extractor: Extractor, extractor_fp: str | None = None
    ) -> AttributePredictor:
        heads, meta = load_heads(heads_dir)
        check_extractor(meta, extractor_fp or fingerprint(extractor))
        return cls(extractor.eval(), heads, meta)

    @property
    def kinds(self) -> list[str]:
        return sorted({k for h in self.heads.values() for k in h.config.features})

    def predict(self, images: Sequence[Image.Image], top_k: int = 3) -> pd.DataFrame:
        """One row per (image, attribute, rank): the ``top_k`` labels with their probabilities."""
        if not images:
            return pd.DataFrame(columns=list(ATTRIBUTE_COLUMNS))
        feats = image_features(
            self.extractor, images, self.kinds, tuple(self.meta.get("gram_blocks") or ())
        )
        rows = []
        for name, head in self.heads.items():
            ranked = head.top_k(head_input(feats, head.config.features), top_k)
            for row, labels in enumerate(ranked):
                rows += [(row, name, r + 1, lab, p) for r, (lab, p) in enumerate(labels)]
        return pd.DataFrame(rows, columns=list(ATTRIBUTE_COLUMNS))
