"""The text side in the registry: ``imgsearch-text`` versions and the index model's text parts.

``imgsearch-text`` is the aligned text encoder on its own (a pyfunc: ``text`` in, an embedding in
the image space out), for users who embed texts elsewhere. Each version is tagged with the
extractor version and fingerprint it was aligned to and the index version it ships in; the
registry checksums of its files are tags too. The index model carries its own copy of the
encoder (:mod:`registry.text_queries`), checked against its extractor at registration and at
load: a text model and an index from different extractors never work together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from imgsearch.embed.text_query import META_FILE, load_text_encoder
from imgsearch.errors import ConfigError, ExtractorMismatchError
from registry import integrity, text_queries
from registry.integrity import verify_loaded
from registry.packaging import MODEL_CODE, SERVING_CONFIG, code_paths, pip_requirements
from registry.tags import TAG_EXTRACTOR_VERSION, TAG_FINGERPRINT, TAG_INDEX_VERSION
from registry.versions import register_version

TEXT_MODEL = "imgsearch-text"
TAG_TEXT_FINGERPRINT = "text_fingerprint"
TAG_TEXT_TOWER = "text_tower"
EMBEDDING = "embedding"


def check_text_artifacts(artifacts: Mapping[str, Path], extractor_fp: str) -> dict[str, str]:
    """Tags for an index model's text parts; refuses an encoder aligned to another extractor."""
    if not artifacts:
        return {}
    unknown = sorted(set(artifacts) - set(text_queries.TEXT_ARTIFACTS))
    if unknown or text_queries.ARTIFACT_TEXT not in artifacts:
        raise ConfigError(
            f"text artifacts must include {text_queries.ARTIFACT_TEXT!r} and only "
            f"{list(text_queries.TEXT_ARTIFACTS)}; got {sorted(artifacts)}"
        )
    meta = json.loads((Path(artifacts[text_queries.ARTIFACT_TEXT]) / META_FILE).read_text())
    if meta.get("extractor_fingerprint") != extractor_fp:
        raise ExtractorMismatchError(
            f"the text encoder was aligned to extractor {str(meta.get('extractor_fingerprint'))[:12]}, "
            f"the index was built with {extractor_fp[:12]}: re-run align with this extractor"
        )
    return {TAG_TEXT_FINGERPRINT: str(meta["fingerprint"]), TAG_TEXT_TOWER: str(meta["tower"])}


class TextModel(PythonModel):
    """Texts -> unit vectors in the image space of the extractor the encoder was aligned to.

    Input: a ``text`` column (and an optional ``lang``); a text with a restricted word refuses
    the request (HTTP 400 with the reason). Output: ``embedding`` per row.
    """

    def load_context(self, context: Any) -> None:
        names = tuple(a for a in text_queries.TEXT_ARTIFACTS if a in context.artifacts)
        verify_loaded(context, names)
        encoder = load_text_encoder(Path(context.artifacts[text_queries.ARTIFACT_TEXT]))
        self.side = text_queries.TextSide.load(
            dict(context.artifacts), encoder.extractor_fingerprint
        )

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if not text_queries.has_text(model_input):
            raise text_queries._invalid(f"input needs a {text_queries.TEXT_COLUMN!r} column")
        texts, langs = text_queries.text_cells(model_input, len(model_input))
        assert self.side is not None
        self.side.check(texts, langs)
        emb = self.side.embed(texts)
        missing = [i for i, t in enumerate(texts) if t is None]
        if missing:
            raise text_queries._invalid(f"rows {missing[:5]} have no text")
        return pd.DataFrame({EMBEDDING: [emb[i].tolist() for i in range(len(texts))]})


def text_signature() -> ModelSignature:
    columns: list[ColSpec | TensorSpec] = [
        ColSpec("string", text_queries.TEXT_COLUMN),
        ColSpec("string", text_queries.LANG_COLUMN, required=False),
    ]
    return ModelSignature(inputs=Schema(columns))


def log_text_model(
    artifacts: Mapping[str, Path],
    *,
    extractor_version: ModelVersion,
    index_version: ModelVersion,
    source_run_id: str,
    alias: str,
    client: MlflowClient | None = None,
    name: str = TEXT_MODEL,
) -> ModelVersion:
    """Log and register the text encoder (find-or-create, like the other models: a retried
    registration finds the version and leaves it as it was)."""

    client = client or MlflowClient()
    fp = str((extractor_version.tags or {}).get(TAG_FINGERPRINT))
    tags = {
        **check_text_artifacts(artifacts, fp),
        TAG_EXTRACTOR_VERSION: str(extractor_version.version),
        TAG_INDEX_VERSION: str(index_version.version),
        **integrity.artifact_checksums(dict(artifacts)),
    }

    def _log() -> Any:
        return mlflow.pyfunc.log_model(
            name="text",
            python_model=str(MODEL_CODE / "text_model.py"),
            artifacts={k: str(v) for k, v in artifacts.items()},
            code_paths=code_paths(),
            signature=text_signature(),
            pip_requirements=pip_requirements(),
            # logged so that load_verified's checksums (and serving bounds) reach load_context
            model_config=SERVING_CONFIG,
        )

    data_hash = str((index_version.tags or {}).get("data_hash", ""))
    version, _ = register_version(client, name, source_run_id, data_hash, fp, tags, alias, _log)
    return version
