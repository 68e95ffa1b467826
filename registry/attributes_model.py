"""``imgsearch-attributes``: the attribute heads as a servable model, tied to one extractor.

A version ships the heads (``attributes/``, written by ``steps.attributes``) and the extractor
they were trained on (``extractor/``), so it answers an image on its own: image in, the top-3
labels of each attribute with their probabilities out. It is tagged with the extractor's
registered version and fingerprint and with the sha256 of every file
(:mod:`registry.integrity`); heads trained on another extractor are refused at registration and
at load (:class:`~imgsearch.errors.ExtractorMismatchError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Schema

from imgsearch.embed.attributes_query import ATTRIBUTE_COLUMNS, AttributePredictor, check_extractor
from imgsearch.models.attribute_heads import read_meta
from imgsearch.models.backbones import load_extractor
from registry import integrity
from registry.decoding import _allow_paths, _image_values, _jsonable, _limits, decode_images
from registry.integrity import verify_loaded
from registry.packaging import (
    MODEL_CODE,
    SERVING_CONFIG,
    code_paths,
    extractor_fingerprint,
    pip_requirements,
)
from registry.params import IMAGE_COLUMN
from registry.tags import TAG_EXTRACTOR_VERSION, TAG_FINGERPRINT
from registry.versions import register_version

ATTRIBUTES_MODEL = "imgsearch-attributes"
ARTIFACT_ATTRIBUTES = "attributes"
ARTIFACT_EXTRACTOR = "extractor"
TAG_ATTRIBUTES = "attributes"
ERROR = "error"
OUTPUT_COLUMNS = ("query", *ATTRIBUTE_COLUMNS[1:], ERROR)


class AttributesModel(PythonModel):
    """Image queries -> one row per (query, attribute, rank): ``label``, ``probability``; a bad
    image gets one row with its ``error`` (the others are answered)."""

    def load_context(self, context: Any) -> None:
        # the registry's checksums, before torch or skops parses a byte
        verify_loaded(context, (ARTIFACT_EXTRACTOR, ARTIFACT_ATTRIBUTES))
        extractor = load_extractor(Path(context.artifacts[ARTIFACT_EXTRACTOR]))
        self.predictor = AttributePredictor.load(
            Path(context.artifacts[ARTIFACT_ATTRIBUTES]), extractor
        )
        self.allow_paths = _allow_paths(context)
        self.limits = _limits(context)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        images, errors = decode_images(
            _image_values(model_input), allow_paths=self.allow_paths, limits=self.limits
        )
        rows = [i for i, img in enumerate(images) if img is not None]
        found = self.predictor.predict([images[i] for i in rows])  # type: ignore[misc]
        found["query"] = [rows[r] for r in found["row"]]
        found[ERROR] = None
        bad = pd.DataFrame(
            {
                "query": [i for i, e in enumerate(errors) if e is not None],
                ERROR: [e for e in errors if e is not None],
            }
        )
        out = pd.concat([found.drop(columns="row"), bad], ignore_index=True)
        out = out.sort_values(["query", "attribute", "rank"], na_position="first", kind="stable")
        return _jsonable(out.reindex(columns=list(OUTPUT_COLUMNS)).reset_index(drop=True))


def attributes_signature() -> ModelSignature:
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]))


def log_attributes_model(
    heads_dir: Path,
    extractor_dir: Path,
    *,
    extractor_version: ModelVersion,
    source_run_id: str,
    alias: str = "",
    client: MlflowClient | None = None,
    name: str = ATTRIBUTES_MODEL,
) -> ModelVersion:
    """Log and register the heads with their extractor (find-or-create, like the other models).

    Refuses (``ExtractorMismatchError``) heads trained on another extractor than
    ``extractor_dir`` holds, and an ``extractor_dir`` that is not ``extractor_version``'s."""
    client = client or MlflowClient()
    fp = extractor_fingerprint(Path(extractor_dir))
    check_extractor(
        {"extractor_fingerprint": (extractor_version.tags or {}).get(TAG_FINGERPRINT)}, fp
    )
    meta = read_meta(Path(heads_dir))
    check_extractor(meta, fp)
    artifacts = {ARTIFACT_EXTRACTOR: Path(extractor_dir), ARTIFACT_ATTRIBUTES: Path(heads_dir)}
    tags = {
        TAG_EXTRACTOR_VERSION: str(extractor_version.version),
        TAG_ATTRIBUTES: ",".join(sorted(meta["heads"])),
        **integrity.artifact_checksums(artifacts),
    }

    def _log() -> Any:
        return mlflow.pyfunc.log_model(
            name="attributes",
            python_model=str(MODEL_CODE / "attributes_model.py"),
            artifacts={k: str(v) for k, v in artifacts.items()},
            code_paths=code_paths(),
            signature=attributes_signature(),
            pip_requirements=pip_requirements(),
            # logged so that load_verified's checksums (and serving bounds) reach load_context
            model_config=SERVING_CONFIG,
        )

    data_hash = integrity.tree_sha256(Path(heads_dir))
    version, _ = register_version(client, name, source_run_id, data_hash, fp, tags, alias, _log)
    return version
