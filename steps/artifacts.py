"""Artifacts read by URI without filling the disk.

``mlflow.artifacts.download_artifacts`` without ``dst_path`` copies a ``runs:/`` artifact into a
new temporary directory on every call, from a local store too, and never removes it: a step
reading a run's manifest, embeddings or frozen-trunk outputs left a copy in the temporary folder
each time, and the improve daemon, which reads the champion's every job, would fill the disk.
Here an artifact of a local store (``mlruns/``, ``file:``) is read in place, without a copy, and
anything else (a tracking server's ``mlflow-artifacts:``, ``s3://``, ``models:/...``) is
downloaded into this process's one download folder, emptied by :func:`clear_downloads` (the
improve job calls it when a job ends) and removed at exit. Callers read what they are given and
never write into it.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow

log = logging.getLogger(__name__)

_downloads: Path | None = None


def _download_dir() -> Path:
    global _downloads
    if _downloads is None or not _downloads.is_dir():
        _downloads = Path(tempfile.mkdtemp(prefix="imgsearch-artifacts-"))
        atexit.register(shutil.rmtree, _downloads, True)
    return _downloads


def clear_downloads() -> None:
    """Remove what this process has downloaded so far (paths handed out before become invalid)."""
    global _downloads
    if _downloads is not None:
        shutil.rmtree(_downloads, ignore_errors=True)
        _downloads = None


def _local_dir(uri: str) -> Path | None:
    """The local folder a ``file:`` (or scheme-less) URI names, else None."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a path (a Windows drive letter too)
        return Path(uri)
    return None


def in_place(uri: str) -> Path | None:
    """Where a ``runs:/<run_id>/<path>`` artifact already is on this machine (a local artifact
    store), or None (a remote store, another kind of URI, or not there)."""
    parsed = urlparse(uri)
    if parsed.scheme != "runs":
        return None
    run_id, _, path = parsed.path.lstrip("/").partition("/")
    root = _local_dir(mlflow.get_run(run_id).info.artifact_uri)
    if root is None:
        return None
    local = root / path if path else root
    return local if local.exists() else None


def local_artifact(uri: str) -> Path:
    """A local path for ``uri``: a local file or folder as it is, a local store's artifact in
    place, anything else downloaded into this process's download folder. Raises what MLflow
    raises for an artifact that does not exist."""
    local = _local_dir(uri)
    if local is not None and local.expanduser().exists():
        return local.expanduser()
    found = in_place(uri)
    if found is not None:
        return found
    dst = _download_dir() / uuid.uuid4().hex
    dst.mkdir()
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def artifact_path(run_id: str, name: str) -> Path:
    """Local path of artifact ``name`` of run ``run_id`` (:func:`local_artifact`)."""
    return local_artifact(f"runs:/{run_id}/{name}")
