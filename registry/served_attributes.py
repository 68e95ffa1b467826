"""Predicted attributes beside a search answer: ``imgsearch-attributes@<alias>``, used only when it
was trained on the extractor version the served index was built with.

:func:`load_attributes` returns a :class:`ServedAttributes` whose ``model`` is ``None`` with a
``note`` saying why when there is nothing to show: no attributes model registered under the
alias, one registered for another extractor version (refused: a person re-runs the
``attributes`` step on the champion extractor), or one whose files fail their checksums. Search
never fails because of the attributes. :func:`predict_attributes` gives the top label of each
attribute per query with its probability; :func:`attribute_summary` one line per query.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from imgsearch.errors import ImgsearchError
from registry.attributes_model import ATTRIBUTES_MODEL
from registry.integrity import load_verified
from registry.params import IMAGE_COLUMN
from registry.tags import TAG_EXTRACTOR_VERSION

log = logging.getLogger(__name__)


@dataclass
class ServedAttributes:
    """A loaded attributes model (or ``None`` and why), and its registry version."""

    model: Any = None  # mlflow.pyfunc.PyFuncModel of imgsearch-attributes
    version: str | None = None
    note: str = ""

    @property
    def label(self) -> str:
        return f"{ATTRIBUTES_MODEL} v{self.version}" if self.model is not None else self.note


def load_attributes(
    alias: str, extractor_version: str | None, client: MlflowClient | None = None
) -> ServedAttributes:
    """``imgsearch-attributes@alias`` when it was trained on ``extractor_version``; else why not."""
    client = client or MlflowClient()
    try:
        mv = client.get_model_version_by_alias(ATTRIBUTES_MODEL, alias)
    except MlflowException:
        return ServedAttributes(note=f"no {ATTRIBUTES_MODEL}@{alias} registered")
    trained_on = (mv.tags or {}).get(TAG_EXTRACTOR_VERSION)
    if extractor_version is None or str(trained_on) != str(extractor_version):
        note = (
            f"{ATTRIBUTES_MODEL} v{mv.version} was trained on extractor v{trained_on}, the served "
            f"index on v{extractor_version}: not used (re-run the attributes step)"
        )
        log.warning(note)
        return ServedAttributes(version=str(mv.version), note=note)
    try:
        model = load_verified(f"models:/{ATTRIBUTES_MODEL}/{mv.version}", client=client)
    except (MlflowException, ImgsearchError, OSError) as exc:
        note = f"{ATTRIBUTES_MODEL} v{mv.version} not used: {exc}"
        log.warning(note)
        return ServedAttributes(version=str(mv.version), note=note)
    log.info("predicted attributes from %s v%s", ATTRIBUTES_MODEL, mv.version)
    return ServedAttributes(model=model, version=str(mv.version))


def predict_attributes(served: ServedAttributes, queries: Sequence[bytes]) -> pd.DataFrame:
    """Checked query bytes -> the top label per (query, attribute): ``query``, ``attribute``,
    ``label``, ``probability``, ``error``; empty when there is no model."""
    columns = ["query", "attribute", "label", "probability", "error"]
    if served.model is None or not queries:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(q).decode() for q in queries]})
    out = served.model.predict(frame)
    top = out[(out["rank"] == 1) | out["error"].notna()]
    return top.reindex(columns=columns).reset_index(drop=True)


def attribute_summary(predicted: pd.DataFrame, query: int) -> str:
    """``category Animals & Nature (0.82) · vendor google (0.97)`` for one query ('' if none)."""
    rows = predicted[predicted["query"] == query]
    errors = rows["error"].dropna()
    if not errors.empty:
        return f"attributes not predicted: {errors.iloc[0]}"
    return " · ".join(
        f"{r.attribute} {r.label} ({float(r.probability):.2f})"
        for r in rows.sort_values("attribute").itertuples()
    )
