"""Checksums kept in the registry, checked before any parser (FAISS, torch.load) reads a byte.

Why the registry and not ``index.json``: anyone who can write the artifact store can rewrite a
file *and* the sidecar hash beside it. Model version tags live in the tracking database, which
the artifact store cannot write. Registration records, as version tags:

* ``sha256.<artifact>/<file>`` for every file of the extractor (``weights.pt``, ``spec.json``)
  and, on an index version, of the index (``index.faiss``, ``meta.parquet``, ``index.json``);
* ``sha256.model``: a digest of the whole logged model directory (``MLmodel``, the
  models-from-code file and the ``code/`` the model ships). This one matters most: MLflow runs
  that code when it loads the model, so a check inside the pyfunc could be rewritten along with
  the bytes it checks.

:func:`load_verified` is the trust anchor. It runs in the serving process, from the installed
code: it resolves ``models:/<name>@<alias>`` (or ``/<version>``) to one version *through the
registry*, downloads that version, compares the directory digest and every file with the tags,
and only then hands the directory to :func:`mlflow.pyfunc.load_model`, passing the expected
file checksums as load-time ``model_config`` (load-time config overrides the logged one, so a
rewritten ``MLmodel`` cannot supply its own). The pyfuncs then check the extractor and index
files against those again right before parsing them (:func:`verify_artifact`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgsearch.errors import IndexIntegrityError

log = logging.getLogger(__name__)

TAG_PREFIX = "sha256."
TAG_MODEL_TREE = "sha256.model"
#: model_config key through which :func:`load_verified` hands the registry's checksums in.
CONFIG_KEY = "registry_checksums"
_CHUNK = 1 << 20


class ArtifactIntegrityError(IndexIntegrityError):
    """A model file does not match the checksum the registry recorded for it."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> dict[str, Path]:
    """relative posix path -> file, for every regular file under ``directory``."""
    root = Path(directory)
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def artifact_checksums(artifacts: Mapping[str, Path]) -> dict[str, str]:
    """Version tags ``sha256.<artifact>/<file>`` for every file of each artifact directory."""
    tags: dict[str, str] = {}
    for name, directory in artifacts.items():
        for rel, path in _files(Path(directory)).items():
            tags[f"{TAG_PREFIX}{name}/{rel}"] = file_sha256(path)
    return tags


#: written by MLflow into the downloaded copy of a ``models:/<name>/<version>`` URI (the name
#: and version it was fetched as), so it differs between downloads: left out of the digest
_DOWNLOAD_MARKERS = frozenset({"registered_model_meta"})


def tree_sha256(directory: Path) -> str:
    """One digest over every file's relative path and sha256 (order-independent), except the
    marker file MLflow writes on download."""
    digest = hashlib.sha256()
    for rel, path in _files(Path(directory)).items():
        if rel in _DOWNLOAD_MARKERS:
            continue
        digest.update(f"{rel}\t{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def checksum_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (tags or {}).items() if k.startswith(TAG_PREFIX)}


def verify_artifact(name: str, directory: Path, expected: Mapping[str, str]) -> None:
    """Refuse ``directory`` unless its files are exactly those the registry recorded for
    artifact ``name``, byte for byte. Raises :class:`ArtifactIntegrityError` naming both hashes."""
    prefix = f"{TAG_PREFIX}{name}/"
    want = {k[len(prefix) :]: v for k, v in expected.items() if k.startswith(prefix)}
    if not want:
        raise ArtifactIntegrityError(f"the registry records no checksums for artifact {name!r}")
    have = _files(Path(directory))
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    if extra or missing:
        raise ArtifactIntegrityError(
            f"artifact {name!r} at {directory}: files differ from the registry's record "
            f"(unexpected {extra}, missing {missing})"
        )
    for rel, sha in sorted(want.items()):
        got = file_sha256(have[rel])
        if got != sha:
            raise ArtifactIntegrityError(
                f"{name}/{rel}: sha256 {got} does not match the registry's {sha}; refusing to "
                "parse it"
            )


def expected_from_config(config: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The checksums :func:`load_verified` passed in, or None when the model was loaded
    another way (then only the sidecar ``index.json`` is checked)."""
    raw = (config or {}).get(CONFIG_KEY)
    if not raw:
        return None
    data = json.loads(raw) if isinstance(raw, str) else dict(raw)
    return {str(k): str(v) for k, v in data.items()}


def verify_loaded(context: Any, names: tuple[str, ...]) -> None:
    """In a pyfunc's ``load_context``: check ``names`` against the registry before parsing."""
    expected = expected_from_config(getattr(context, "model_config", None))
    if expected is None:
        log.warning(
            "model loaded without registry checksums (use registry.integrity.load_verified): "
            "only the index's own index.json is checked"
        )
        return
    for name in names:
        verify_artifact(name, Path(context.artifacts[name]), expected)


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    if not uri.startswith("models:/"):
        raise ArtifactIntegrityError(f"{uri!r} is not a registry URI (models:/<name>@<alias>)")
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise ArtifactIntegrityError(f"{uri!r} is not models:/<name>/<version> or @<alias>")
    return name, version, None


def download_verified(
    model_uri: str, dst: Path, *, client: Any = None
) -> tuple[Path, dict[str, str]]:
    """Download the version ``model_uri`` names (resolved *through the registry*) into ``dst`` and
    check its directory digest against the version's tags; (the local model directory, the
    expected per-file checksums). Raises :class:`ArtifactIntegrityError` on any mismatch or on
    a version registered without checksums."""
    import mlflow
    from mlflow import MlflowClient

    client = client or MlflowClient()
    name, version, alias = parse_models_uri(model_uri)
    mv = (
        client.get_model_version_by_alias(name, alias)
        if alias is not None
        else client.get_model_version(name, str(version))
    )
    expected = checksum_tags(mv.tags)
    if TAG_MODEL_TREE not in expected:
        raise ArtifactIntegrityError(
            f"{name} v{mv.version} records no {TAG_MODEL_TREE} tag: registered before checksums "
            "were kept in the registry; register it again"
        )
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}", dst_path=str(dst))
    )
    got = tree_sha256(local)
    if got != expected[TAG_MODEL_TREE]:
        raise ArtifactIntegrityError(
            f"{name} v{mv.version}: model directory digest {got} does not match the "
            f"registry's {expected[TAG_MODEL_TREE]}; refusing to load it"
        )
    return local, {k: v for k, v in expected.items() if k != TAG_MODEL_TREE}


def load_verified(
    model_uri: str, *, client: Any = None, model_config: Mapping[str, Any] | None = None
) -> Any:
    """Load a registered model only after its bytes match the checksums in its version tags.

    Raises :class:`ArtifactIntegrityError` (a tampered file, a version registered without
    checksums) before MLflow runs any of the model's code.
    """
    import mlflow

    tmp = Path(tempfile.mkdtemp(prefix="imgsearch-model-"))
    try:
        local, files = download_verified(model_uri, tmp, client=client)
        config = {**dict(model_config or {}), CONFIG_KEY: json.dumps(files, sort_keys=True)}
        # everything is read into memory at load time, so the copy can go afterwards
        return mlflow.pyfunc.load_model(str(local), model_config=config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
