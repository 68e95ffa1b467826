"""The query image's predicted attributes in the HTTP-served answer (``imgsearch serve``).

The page and the CLI show them from ``imgsearch-attributes@champion``
(:mod:`registry.served_attributes`). For the HTTP server, ``imgsearch serve`` bundles that
version's attribute heads into its checked copy of the index version (the same mechanism as the
reranker, :mod:`registry.served_rerank`), only when they were trained on the extractor version
the served index was built with (tag ``extractor_version``; else they are not used and it says
why). The index pyfunc then runs them on its own extractor (which refuses heads of another
extractor fingerprint) and adds, to every answered row of an *image* query,
``predicted_<attribute>`` (the top label) and ``predicted_<attribute>_probability``. Text
queries, and a copy without heads, answer as before.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from imgsearch.embed.attributes_query import AttributePredictor
from imgsearch.models.backbones import Extractor
from registry.served_rerank import add_artifact, artifact_dir, bundled_artifact, downloaded_name

log = logging.getLogger(__name__)

#: the heads' artifact name, in the attributes version and in the served copy of the index
ARTIFACT_ATTRIBUTES = "attributes"
VERSION_KEY = "attributes_version"
PREFIX = "predicted_"


class BundledAttributes:
    """Attribute heads loaded on the index model's extractor (see the module docstring)."""

    def __init__(self, predictor: AttributePredictor, version: str | None) -> None:
        self.predictor = predictor
        self.version = version

    @classmethod
    def from_context(
        cls, context: Any, extractor: Extractor, extractor_fp: str
    ) -> BundledAttributes | None:
        """The bundled heads (checked by the caller's ``verify_loaded``), or None. Heads of
        another extractor are refused (``ExtractorMismatchError``)."""
        bundled = bundled_artifact(context, ARTIFACT_ATTRIBUTES, VERSION_KEY)
        if bundled is None:
            return None
        path, version = bundled
        predictor = AttributePredictor.load(path, extractor, extractor_fp)
        log.info("predicted attributes from imgsearch-attributes v%s", version or "?")
        return cls(predictor, version)

    def annotate(
        self, out: pd.DataFrame, images: Sequence[Image.Image | None], query: str = "query"
    ) -> pd.DataFrame:
        """``out`` with the top label and probability of each attribute of its query's image."""
        rows = [i for i, img in enumerate(images) if img is not None]
        usable = [img for img in images if img is not None]
        if out.empty or not rows:
            return out
        found = self.predictor.predict(usable, top_k=1)
        found[query] = [rows[r] for r in found["row"]]
        wide = found.pivot_table(
            index=query, columns="attribute", values=["label", "probability"], aggfunc="first"
        )
        flat = pd.DataFrame(index=wide.index)
        for attribute in sorted(found["attribute"].unique()):
            flat[f"{PREFIX}{attribute}"] = wide[("label", attribute)]
            flat[f"{PREFIX}{attribute}_probability"] = wide[("probability", attribute)]
        keys = pd.to_numeric(out[query], errors="coerce")
        answered = out[query].notna() & out["rank"].notna()
        extra = flat.reindex(keys.where(answered)).reset_index(drop=True)
        extra.index = out.index
        return pd.concat([out, extra], axis=1)


def bundle_attributes(
    model_dir: Path, index_version: str, *, alias: str = "champion", client: Any = None
) -> tuple[str | None, str, dict[str, str]]:
    """Put the heads of ``imgsearch-attributes@alias`` into the served copy of
    ``index_version`` when they were trained on its extractor version. Returns (the attributes
    version or None, a line saying what was done or why not, the bundled files' checksums)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from imgsearch.errors import ImgsearchError
    from registry.attributes_model import ATTRIBUTES_MODEL
    from registry.integrity import download_verified
    from registry.tags import TAG_EXTRACTOR_VERSION

    client = client or MlflowClient()
    name = ATTRIBUTES_MODEL
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None, f"no {name}@{alias}: no predicted attributes in the answer", {}
    try:
        if not (Path(model_dir) / "code" / "registry" / "bundled_attributes.py").is_file():
            raise ImgsearchError(
                f"index v{index_version} was registered by code that predates served attributes"
            )
        index_mv = client.get_model_version(downloaded_name(model_dir), str(index_version))
        want = (index_mv.tags or {}).get(TAG_EXTRACTOR_VERSION)
        trained_on = (mv.tags or {}).get(TAG_EXTRACTOR_VERSION)
        if want is None or str(trained_on) != str(want):
            raise ImgsearchError(
                f"trained on extractor v{trained_on}, the served index on v{want} "
                "(re-run the attributes step)"
            )
        with tempfile.TemporaryDirectory(prefix="imgsearch-attributes-") as tmp:
            local, files = download_verified(
                f"models:/{name}/{mv.version}", Path(tmp), client=client
            )
            source = artifact_dir(local, ARTIFACT_ATTRIBUTES)
            if source is None:
                raise ImgsearchError(f"{name} v{mv.version} has no {ARTIFACT_ATTRIBUTES} artifact")
            add_artifact(model_dir, ARTIFACT_ATTRIBUTES, source, {VERSION_KEY: str(mv.version)})
    except (ImgsearchError, FileExistsError, MlflowException) as exc:
        return None, f"{name}@{alias} v{mv.version} not used: {exc}", {}
    prefix = f"sha256.{ARTIFACT_ATTRIBUTES}/"
    pinned = {k: v for k, v in files.items() if k.startswith(prefix)}
    return str(mv.version), f"predicted attributes from {name} v{mv.version} (@{alias})", pinned
