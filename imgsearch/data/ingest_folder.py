"""Ingest a folder tree: ``<path>/<item_id>/**/<file>``, one row per file.

``item_id`` is the item folder's name and ``image_id`` the file's path relative to the catalog
folder. Names are names: a folder called ``file:weird`` is not read as a URI (its ``uri`` is
written in the ``file:`` form so that it reads back as the same name). Every entry gets a row
or a rejected row with a reason (see :mod:`imgsearch.data.ingest`); hidden entries (names
starting with ``.``: ``.DS_Store``, ``.git``) are not listed but each one is rejected as
``hidden`` (a hidden folder once, its content not walked).
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote_from_bytes

import pandas as pd

from imgsearch import schema as S
from imgsearch.data.catalog import (
    IngestConfig,
    IngestResult,
    clean_text,
    filter_frame,
    finish,
    reject,
)
from imgsearch.data.catalog import (
    data_root as resolve_data_root,
)
from imgsearch.errors import CatalogError, ConfigError, UnsafePathError
from imgsearch.paths import Resolver, is_within, path_to_str

_FILE_SCHEME = "file:"


def ingest_folder(path: Path, cfg: IngestConfig | None = None) -> IngestResult:
    """List a folder tree: ``<path>/<item_id>/**/<file>``; hidden entries are rejected rows."""
    cfg = replace(cfg or IngestConfig(), source="folder", path=str(path))
    folder = Path(path)
    if not folder.is_dir():
        raise CatalogError(f"catalog folder not found: {folder}")
    data_root = resolve_data_root(cfg.data_root or folder)
    folder_real = os.fsencode(folder.resolve())
    root = os.fsencode(data_root)
    if folder_real != root and not is_within(folder_real, root):
        raise ConfigError(f"folder {folder} is not inside data_root {data_root}")
    prefix = os.path.relpath(folder_real, root) if folder_real != root else b""
    rows, rejected = _list_folder(folder_real, prefix, data_root)
    frame = pd.DataFrame(rows, columns=[S.IMAGE_ID, S.ITEM_ID, S.URI])
    frame = filter_frame(frame, cfg.filters)
    result = finish(frame, data_root, rejected, filtered=bool(cfg.filters))
    result.source = {
        "catalog_source": f"folder {folder.resolve()}",
        "catalog_data_root": str(data_root),
    }
    return result


def name_uri(rel: bytes) -> str:
    """The manifest ``uri`` of a listed file: plain text, unless that text would read as a URI.

    :func:`imgsearch.paths.path_to_str` leaves a UTF-8 name as it is, and
    :func:`imgsearch.paths.str_to_path` reads any text starting with ``file:`` as a URI; a
    folder really named ``file:...`` therefore gets the percent-encoded ``file:`` form too.
    """
    text = path_to_str(rel)
    if text[: len(_FILE_SCHEME)].lower() == _FILE_SCHEME and text == os.fsdecode(rel):
        return f"{_FILE_SCHEME}{quote_from_bytes(rel, safe='/')}"
    return text


def _list_folder(
    folder: bytes, prefix: bytes, data_root: Path
) -> tuple[list[dict[str, str]], list[dict[str, object]]]:
    """Depth-first listing on bytes (``folder`` is resolved).

    Rows carry the raw names (undecodable bytes as surrogates): :func:`finish` escapes them
    and rejects a name whose escape clashes with another name. A symlinked folder is followed
    only when it resolves inside the data root and outside ``folder`` and every folder followed
    before (else the same files would be listed twice, or forever in a loop); the others become
    rejected rows.
    """
    rows: list[dict[str, str]] = []
    rejected: list[dict[str, object]] = []
    resolver = Resolver(data_root)
    followed: list[bytes] = [folder]
    stack: list[bytes] = [b""]  # folders to list, relative to ``folder``
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(folder, rel_dir) if rel_dir else folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            uri = name_uri(os.path.join(prefix, rel) if prefix else rel)
            where = {
                S.IMAGE_ID: os.fsdecode(rel),
                S.ITEM_ID: os.fsdecode(rel.split(b"/", 1)[0]),
                S.URI: uri,
            }
            shown = {k: clean_text(v) for k, v in where.items()}  # rejected rows: valid UTF-8
            if entry.name.startswith(b"."):
                kind = "folder (its content is not listed)" if _is_dir(entry) else "file"
                rejected.append(reject(shown, "hidden", f"hidden {kind}"))
            elif entry.is_dir(follow_symlinks=False):
                stack.append(rel)
            elif _is_folder_link(entry):
                try:
                    target = resolver.resolve_bytes(uri)
                except UnsafePathError as exc:
                    rejected.append(reject(shown, "unsafe_path", f"symlinked folder: {exc}"))
                    continue
                seen = [
                    f
                    for f in followed
                    if f == target or is_within(target, f) or is_within(f, target)
                ]
                if seen:
                    detail = f"symlink to a folder listed already: {os.fsdecode(target)!r}"
                    rejected.append(reject(shown, "duplicate_folder", detail))
                    continue
                followed.append(target)
                stack.append(rel)
            elif not _regular_or_link(entry):
                rejected.append(
                    reject(shown, "not_a_file", "not a regular file (FIFO, socket or device)")
                )
            elif rel_dir == b"":
                rejected.append(reject(shown, "no_item", "file outside any item folder"))
            else:
                rows.append(where)
    return rows, rejected


def _is_dir(entry: os.DirEntry[bytes]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_folder_link(entry: os.DirEntry[bytes]) -> bool:
    try:
        return entry.is_symlink() and entry.is_dir(follow_symlinks=True)
    except OSError:  # a looping link: resolve_within refuses it as a file
        return False


def _regular_or_link(entry: os.DirEntry[bytes]) -> bool:
    """Regular files, and symlinks of any kind (resolve_within judges them, open reports dangling)."""
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:  # vanished while listing
        return False
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)
