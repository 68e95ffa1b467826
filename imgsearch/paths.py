"""Resolve catalog paths inside a data root, and carry any file name through a str column.

A catalog (SQL, CSV/Parquet, folder) names its files by ``uri``; :func:`resolve_within` turns one
into an absolute path and refuses anything that would leave the data root: ``../`` escapes,
absolute paths elsewhere, symlinks (files or folders) pointing out, symlink loops, NUL bytes and
empty strings. Paths are resolved on bytes (``os.fsencode``), so file names that are not UTF-8
work too.

Parquet (and most databases) hold UTF-8 text only, so a file name that is not UTF-8 cannot be
stored as is. :func:`path_to_str` keeps every UTF-8 path unchanged and writes the others as a
``file:`` URI with the raw bytes percent-encoded (``file:///data/caf%E9.png``; relative:
``file:item/caf%E9.png``); :func:`str_to_path` (and :func:`resolve_within`) read both forms back.
The one ambiguity: a relative uri whose text really starts with ``file:`` is read as a URI.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import quote_from_bytes, unquote_to_bytes

from imgsearch.errors import UnsafePathError

log = logging.getLogger(__name__)

_FILE_SCHEME = "file:"


def str_to_path(text: str) -> Path:
    """The path a manifest string names: a plain path, or a ``file:`` URI (percent-encoded bytes)."""
    return Path(os.fsdecode(_to_bytes(text)))


def path_to_str(path: str | os.PathLike[str] | bytes) -> str:
    """A UTF-8 str for ``path``: unchanged when it is valid UTF-8, else a percent-encoded ``file:`` URI."""
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        quoted = quote_from_bytes(raw, safe="/")
        return f"file://{quoted}" if raw.startswith(b"/") else f"{_FILE_SCHEME}{quoted}"


def _to_bytes(uri: str | os.PathLike[str] | bytes) -> bytes:
    """``uri`` as file-system bytes; ``file:`` URIs are percent-decoded (local host only)."""
    if isinstance(uri, str) and uri[:5].lower() == _FILE_SCHEME:
        rest = uri[5:]
        if rest.startswith("//"):
            authority, _, tail = rest[2:].partition("/")
            if authority not in ("", "localhost"):
                raise UnsafePathError(f"file URI names another host ({authority!r}): {uri!r}")
            rest = "/" + tail
        return unquote_to_bytes(rest)
    return os.fsencode(uri)


def is_within(path: bytes, root: bytes) -> bool:
    """Whether ``path`` lies strictly below ``root`` (both resolved, as bytes)."""
    return path.startswith(root.rstrip(b"/") + b"/")


def _loops(path: bytes) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _realpath(path: bytes, uri: object) -> bytes:
    """``realpath`` that refuses symlink loops and tolerates missing components."""
    try:
        return os.path.realpath(path, strict=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"symlink loop in {uri!r}") from exc
        # missing (or unreadable) components: resolve what exists; what does not exist cannot
        # be a symlink, so the lexical remainder is safe to check
        real = os.path.realpath(path, strict=False)
        if b".." in real.split(b"/") or _loops(real):
            # a missing component before a looping link hides the loop from the strict pass
            raise UnsafePathError(f"symlink loop in {uri!r}") from exc
        return real


class Resolver:
    """:func:`resolve_within` for many uris under one root: folders are resolved once each.

    Per uri this costs one ``lstat`` of the file itself once its folder is known (the folder's
    own resolution is cached for the life of the resolver: make one per batch).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(os.fsencode(root))
        self._folders: dict[bytes, bytes] = {}

    def resolve(self, uri: str | os.PathLike[str] | bytes) -> Path:
        return Path(os.fsdecode(self.resolve_bytes(uri)))

    def resolve_bytes(self, uri: str | os.PathLike[str] | bytes) -> bytes:
        """Like :meth:`resolve`, as file-system bytes."""
        if isinstance(uri, str | bytes) and len(uri) == 0:
            raise UnsafePathError("empty uri")
        raw = _to_bytes(uri)
        if not raw:
            raise UnsafePathError(f"empty path in uri {uri!r}")
        if b"\x00" in raw:
            raise UnsafePathError(f"NUL byte in uri {uri!r}")
        candidate = raw if os.path.isabs(raw) else os.path.join(self.root, raw)
        head, tail = os.path.split(candidate)
        if tail in (b"", b".", b".."):
            real = _realpath(candidate, uri)
        else:
            folder = self._folders.get(head)
            if folder is None:
                folder = self._folders[head] = _realpath(head, uri)
            real = os.path.join(folder, tail)
            try:
                is_link = stat.S_ISLNK(os.lstat(real).st_mode)
            except OSError:
                is_link = False  # missing: validation reports it
            if is_link:
                real = _realpath(real, uri)
        if not is_within(real, self.root):
            where = (
                "is the data root itself" if real == self.root else "resolves outside the data root"
            )
            raise UnsafePathError(
                f"{uri!r} {where} ({os.fsdecode(real)!r} not inside {os.fsdecode(self.root)!r})"
            )
        return real


def resolve_within(root: str | os.PathLike[str], uri: str | os.PathLike[str] | bytes) -> Path:
    """Absolute, symlink-free path of ``uri`` (relative to ``root``, or absolute inside it).

    The file need not exist (validation reports missing files); every existing component,
    symlinks included, is resolved before the containment check, so a link cannot lead out.
    For many uris under one root, :class:`Resolver` is faster.

    Raises:
        UnsafePathError: empty uri, NUL byte, a remote ``file:`` URI, a symlink loop, or a path
            that resolves outside ``root`` (or to ``root`` itself, which is not a file).
    """
    return Resolver(root).resolve(uri)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable; a no-op where directories cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, *, durable: bool = True) -> Iterator[IO[bytes]]:
    """Write ``path`` all or nothing: the block writes to a temporary file beside it, which is
    fsynced and then ``os.replace``d over ``path``. A crash or an exception leaves the previous
    file (or none), never half of the new one; the temporary file is removed on failure.

    ``durable=False`` skips the fsyncs (file and folder): for caches of many small files that can
    be rebuilt, where readers must never see half a file but a power cut may lose the newest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (memory stays flat for large files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
