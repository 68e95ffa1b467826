"""Text queries for the served index model: words in, the same ranked images out.

A request row may hold an ``image``, a ``text`` (with an optional ``lang``), or both. A text is
embedded into the image space by the aligned text encoder the index model ships
(:class:`~imgsearch.embed.text_query.TextQueryEncoder`, checked at load against the index's
extractor: a text model aligned to another extractor is refused); a row with both is the
normalised weighted sum ``text_weight * text + (1 - text_weight) * image``.

Restricted words (:mod:`imgsearch.search.restricted`, the policy shipped with the model): a text
that matches refuses the whole request with HTTP 400 and the reason (the matched policy word),
counted in :attr:`TextSide.refused`; nothing is searched. Images flagged by the zero-shot
restricted-content check are left out of the results of text queries when the model was logged
with ``exclude_flagged`` (their ids ship as an artifact).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from imgsearch.embed.text_query import TextQueryEncoder, load_text_encoder
from imgsearch.errors import ConfigError
from imgsearch.evaluate.metrics import l2_normalise
from imgsearch.search.restricted import RestrictedPolicy

log = logging.getLogger(__name__)

TEXT_COLUMN = "text"
LANG_COLUMN = "lang"
ARTIFACT_TEXT = "text_encoder"
ARTIFACT_POLICY = "restricted_policy"
ARTIFACT_FLAGS = "restricted_flags"
TEXT_ARTIFACTS = (ARTIFACT_TEXT, ARTIFACT_POLICY, ARTIFACT_FLAGS)
POLICY_FILE = "restricted.yaml"  # inside the restricted_policy artifact directory
FLAGS_FILE = "restricted_flags.parquet"  # inside the restricted_flags artifact directory
DEFAULT_TEXT_WEIGHT = 0.5


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _cell(value: Any) -> str | None:
    """A text cell as str, or None when empty/missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def text_cells(model_input: Any, n_rows: int) -> tuple[list[str | None], list[str | None]]:
    """``(texts, langs)`` per input row (None where a row has none)."""
    if isinstance(model_input, pd.DataFrame) and TEXT_COLUMN in model_input.columns:
        texts = [_cell(v) for v in model_input[TEXT_COLUMN]]
        langs: list[str | None] = (
            [_cell(v) for v in model_input[LANG_COLUMN]]
            if LANG_COLUMN in model_input.columns
            else [None] * len(texts)
        )
        return texts, langs
    return [None] * n_rows, [None] * n_rows


def has_text(model_input: Any) -> bool:
    return isinstance(model_input, pd.DataFrame) and TEXT_COLUMN in model_input.columns


class TextSide:
    """The text half of an index model: encoder, policy, flagged images."""

    def __init__(
        self,
        encoder: TextQueryEncoder,
        policy: RestrictedPolicy | None,
        flagged: frozenset[str] = frozenset(),
    ) -> None:
        self.encoder = encoder
        self.policy = policy
        self.flagged = flagged
        self.refused = 0

    @classmethod
    def load(cls, artifacts: dict[str, str], extractor_fingerprint: str) -> TextSide | None:
        """From the model's artifacts, or None when the model was logged without a text encoder."""
        directory = artifacts.get(ARTIFACT_TEXT)
        if not directory:
            return None
        encoder = load_text_encoder(Path(directory))
        encoder.check_extractor(extractor_fingerprint)  # ExtractorMismatchError: refused at load
        policy_dir = artifacts.get(ARTIFACT_POLICY)
        policy = RestrictedPolicy.load(Path(policy_dir) / POLICY_FILE) if policy_dir else None
        flags_dir = artifacts.get(ARTIFACT_FLAGS)
        flagged: frozenset[str] = frozenset()
        if flags_dir:
            flags = pd.read_parquet(Path(flags_dir) / FLAGS_FILE)
            flagged = frozenset(flags.loc[flags["flagged"].astype(bool), "image_id"].astype(str))
        return cls(encoder, policy, flagged)

    def check(self, texts: Sequence[str | None], langs: Sequence[str | None]) -> None:
        """Refuse the request (HTTP 400 with the reason) when any text matches the policy."""
        if self.policy is None:
            return
        for row, (text, lang) in enumerate(zip(texts, langs, strict=True)):
            if text is None:
                continue
            match = self.policy.check(text, lang=lang)
            if match is not None:
                self.refused += 1
                log.warning(
                    "refused a text query (restricted word %r); %d so far", match.word, self.refused
                )
                raise _invalid(
                    f"query refused: row {row} contains a restricted word ({match.word!r}, {match.lang}); "
                    "this service does not search for it"
                )

    def embed(self, texts: Sequence[str | None]) -> dict[int, np.ndarray]:
        """Row -> text embedding in the image space, for the rows that have a text."""
        rows = [i for i, t in enumerate(texts) if t is not None]
        if not rows:
            return {}
        try:
            emb = self.encoder.encode([texts[i] for i in rows])  # type: ignore[misc]
        except ConfigError as exc:
            raise _invalid(f"bad text query: {exc}") from exc
        return dict(zip(rows, emb, strict=True))


def combine(
    image: np.ndarray | None, text: np.ndarray | None, text_weight: float
) -> np.ndarray | None:
    """One query vector from an image and/or a text embedding (unit length)."""
    if image is None:
        return text
    if text is None:
        return image
    mixed = text_weight * text + (1.0 - text_weight) * image
    return l2_normalise(mixed[None, :].astype(np.float32))[0]
