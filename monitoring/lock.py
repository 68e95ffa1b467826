"""One job per store: an exclusive ``flock`` keyed on the store itself, not on how it is spelled.

``store_key`` turns a SQLAlchemy URL into the identity of the store: a SQLite file by its resolved
path (symlinks, ``..`` and relative paths resolved), a server database by backend, host, port and
database name (driver, user, password and query options dropped: ``postgresql+psycopg://a@H/db``
and ``postgresql://b@h:5432/db`` are one store). The lock file lives next to a SQLite file, and
for a server store under the home dir (which guards one host; the scale issue turns it into the
database's own advisory lock).

The daemon holds the lock of its job store for its whole life; ``python -m monitoring.improve``
run by hand takes the same lock for its run (so it cannot overlap the daemon, nor the daemon it).
The OS drops a ``flock`` when its process dies, even on SIGKILL, so a stale lock never blocks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from sqlalchemy.engine import make_url

from imgsearch.config import home_dir
from imgsearch.errors import DaemonAlreadyRunning

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}


def sqlite_file(url: str) -> Path | None:
    """The resolved database file of a SQLite URL, else None (server or in-memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(str(parsed.database)).expanduser().resolve()


def store_key(url: str) -> str:
    """The store's identity (see the module doc)."""
    db = sqlite_file(url)
    if db is not None:
        return f"sqlite:{db}"
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    port = parsed.port or _DEFAULT_PORTS.get(backend, 0)
    return f"{backend}://{(parsed.host or '').lower()}:{port}/{parsed.database or ''}"


def lock_path(url: str) -> Path:
    """``<db>.lock`` next to a SQLite file; ``<home>/daemon-<hash of the store key>.lock`` else."""
    db = sqlite_file(url)
    if db is not None:
        return db.with_name(db.name + ".lock")
    digest = hashlib.sha256(store_key(url).encode()).hexdigest()[:16]
    return home_dir() / f"daemon-{digest}.lock"


@contextlib.contextmanager
def hold(path: Path) -> Iterator[IO[str]]:
    """Hold an exclusive, non-blocking ``flock`` on ``path``; raise :class:`DaemonAlreadyRunning`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the life of the context
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise DaemonAlreadyRunning(
                f"another daemon or improve job holds {path} (pid {holder}); one job per store"
            ) from exc
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield handle
    finally:
        handle.close()  # closing the descriptor releases the lock
