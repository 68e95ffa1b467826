"""The text query path: a text tower plus the projection aligned to one extractor's image space.

:class:`TextQueryEncoder` turns query strings into unit vectors that live in the same space as
the images of the index: ``tower.encode(texts)`` (frozen features) -> ``head`` (the projection
trained by :func:`imgsearch.train.align.align`). It records the fingerprint of the extractor it
was aligned to; :meth:`TextQueryEncoder.check_extractor` refuses any other, because a projection
into one extractor's space is meaningless in another's.

On disk (one directory)::

    text_encoder.json   tower name, extractor fingerprint, dims, the encoder's own fingerprint
    tower/              the text tower (:func:`imgsearch.models.text.load_text_tower`)
    head/               the projection (:func:`imgsearch.models.heads.load_head`)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgsearch.errors import ConfigError, ExtractorMismatchError
from imgsearch.models.heads import Projection, load_head, save_head
from imgsearch.models.text import TextTower, load_text_tower

META_FILE = "text_encoder.json"
MAX_QUERY_CHARS = 1000


@dataclass
class TextQueryEncoder:
    tower: TextTower
    head: Projection
    extractor_fingerprint: str

    @property
    def dim(self) -> int:
        return int(self.head.spec.d_out)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, dim)`` float32 unit vectors in the image space; empty or over-long text is refused."""
        texts = [str(t) for t in texts]
        for t in texts:
            if not t.strip():
                raise ConfigError("an empty text query cannot be searched")
            if len(t) > MAX_QUERY_CHARS:
                raise ConfigError(
                    f"a text query is limited to {MAX_QUERY_CHARS} characters, got {len(t)}"
                )
        feats = np.asarray(self.tower.encode(texts), dtype=np.float32)
        self.head.eval()
        with torch.no_grad():
            return self.head(torch.from_numpy(feats)).numpy().astype(np.float32)

    def check_extractor(self, fingerprint: str) -> None:
        """Refuse an image space other than the one this encoder was aligned to."""
        if fingerprint != self.extractor_fingerprint:
            raise ExtractorMismatchError(
                "this text model was aligned to extractor "
                f"{self.extractor_fingerprint[:12]}, but the index was built with {fingerprint[:12]}: "
                "re-run `align` for the current extractor (text search refuses to mix them)"
            )

    def fingerprint(self) -> str:
        """sha256 over the tower's fingerprint, the head's tensors and the extractor it serves."""
        h = hashlib.sha256()
        h.update(self.tower.fingerprint().encode())
        h.update(self.extractor_fingerprint.encode())
        for key, value in sorted(self.head.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    def meta(self) -> dict[str, Any]:
        return {
            "tower": self.tower.name,
            "tower_dim": int(self.head.spec.d_in),
            "dim": self.dim,
            "extractor_fingerprint": self.extractor_fingerprint,
            "fingerprint": self.fingerprint(),
        }

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.tower.save(directory / "tower")
        save_head(self.head, directory / "head")
        (directory / META_FILE).write_text(json.dumps(self.meta(), indent=2, sort_keys=True))


def load_text_encoder(directory: Path) -> TextQueryEncoder:
    """Read an encoder written by :meth:`TextQueryEncoder.save`; its fingerprint must match its files."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory} holds no readable {META_FILE}: {exc}") from exc
    encoder = TextQueryEncoder(
        tower=load_text_tower(directory / "tower"),
        head=load_head(directory / "head"),
        extractor_fingerprint=str(meta["extractor_fingerprint"]),
    )
    if encoder.fingerprint() != meta.get("fingerprint"):
        raise ConfigError(
            f"the text encoder in {directory} does not match its recorded fingerprint"
        )
    return encoder
