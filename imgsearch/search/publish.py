"""Versioned, atomic index publishing (RELIABILITY 9).

:func:`publish_index` writes a new version next to the old ones (``root/versions/<time>-<uuid>``)
and moves a ``CURRENT`` pointer with one ``os.replace``; :func:`refresh_current` reloads it for a
server, keeping the serving index when the new one is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from imgsearch.errors import ExtractorMismatchError, IndexIntegrityError
from imgsearch.paths import atomic_writer, fsync_dir
from imgsearch.search.index import ImageIndex, verify_dir

log = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"


def _fsync_tree(path: Path) -> None:
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def set_current(root: Path | str, version_dir: Path | str) -> None:
    """Point ``root/CURRENT`` at ``version_dir`` (inside ``root/versions``) in one atomic step.

    The pointer is written to a temporary file, fsynced, then ``os.replace``d: readers see the
    old or the new pointer, never a partial one. Also the way to roll back to an older version.
    """
    root = Path(root)
    target = Path(version_dir).resolve()
    versions = (root / VERSIONS_DIR).resolve()
    if target.parent != versions:
        raise ValueError(f"{version_dir} is not a version directory of {root}")
    verify_dir(target)
    with atomic_writer(root / CURRENT_FILE) as fh:
        fh.write(f"{VERSIONS_DIR}/{target.name}\n".encode())


def publish_index(index: ImageIndex, root: Path | str) -> Path:
    """Publish ``index`` under ``root`` atomically and return its version directory.

    Writes into ``root/versions/.tmp-<uuid>``, fsyncs, renames it to
    ``root/versions/<UTC time>-<uuid>``, re-verifies the checksums, then moves ``CURRENT`` with
    :func:`set_current`. A crash before that last ``os.replace`` leaves the old index current
    (a stray ``.tmp-*`` directory at worst, ignored by readers).
    """
    root = Path(root)
    versions = root / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = versions / f".tmp-{token}"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    final = versions / f"{stamp}-{token}"
    try:
        index.save(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(versions)
    set_current(root, final)
    log.info("published index %s (%d vectors) at %s", index.factory, index.count, final)
    return final


def current_version(root: Path | str) -> Path:
    """The version directory ``root/CURRENT`` points at (refuses pointers leaving ``root/versions``)."""
    root = Path(root)
    try:
        text = (root / CURRENT_FILE).read_text().strip()
    except OSError as exc:
        raise IndexIntegrityError(f"no published index under {root}: {exc}") from exc
    versions = (root / VERSIONS_DIR).resolve()
    target = (root / text).resolve()
    if target.parent != versions or target.name.startswith("."):
        raise IndexIntegrityError(f"{root / CURRENT_FILE} points outside {versions}: {text!r}")
    return target


def current_index(
    root: Path | str, expected_extractor_fingerprint: str | None = None
) -> ImageIndex:
    """Load the index ``root/CURRENT`` points at (checksums verified by :meth:`ImageIndex.load`)."""
    return ImageIndex.load(current_version(root), expected_extractor_fingerprint)


def refresh_current(
    root: Path | str,
    serving: ImageIndex | None,
    expected_extractor_fingerprint: str | None = None,
) -> ImageIndex:
    """Load the current index, or keep ``serving`` when the current one is refused.

    For a server that reloads on a schedule: a tampered or mismatched new version raises inside,
    is logged as an error, and the index already in memory keeps serving. With nothing serving
    yet the error propagates.
    """
    try:
        return current_index(root, expected_extractor_fingerprint)
    except (IndexIntegrityError, ExtractorMismatchError) as exc:
        if serving is None:
            raise
        log.error("refused the current index under %s, keeping the serving one: %s", root, exc)
        return serving
