"""One job per store: an exclusive ``fcntl.flock`` on a lock file derived from the store itself.

A store is identified by :func:`store_key`, not by how its URL happens to be spelled: a SQLite (or
MLflow file-store) path is resolved (symlinks, ``..``, relative to the working directory), so
``sqlite:///link/../link/mlflow.db`` and ``sqlite:////abs/mlflow.db`` are the same store; a
server URL is reduced to scheme (driver dropped), host, port (default ports made explicit) and
database, without user, password or query.

Two locks use it:

* the daemon's store lock (``monitoring.daemon``): one daemon per APScheduler job store
  (RELIABILITY 12), ``<db>.lock`` next to a SQLite job store;
* the job lock (:func:`job_lock`): one improve job per **MLflow tracking store**, taken by the
  daemon for its whole life and by ``python -m monitoring.improve`` run by hand. The tracking store
  is the one thing both agree on (a hand run does not know the daemon's job store) and the thing a
  second job would race on (the champion aliases, the runs, the watermark's data). Lock file:
  ``<db>.improve.lock`` next to a SQLite store (or ``<dir>.improve.lock`` next to a file store),
  else ``$IMGSEARCH_HOME/improve-<sha of the key>.lock`` for a server URL (which guards one host
  only).

A store in **PostgreSQL** (a job store ``postgresql://...``, or a tracking store given by its
database URL) is locked in the database itself instead: a session-level advisory lock
(``pg_try_advisory_lock``) keyed by the lock's name and the store key, held on a connection kept
open for the life of the lock (:func:`advisory_lock`). Daemons on two hosts that share the store
then refuse each other, which a lock file per host cannot do; PostgreSQL drops the lock when the
holder's connection ends (the process died, even on SIGKILL). The holder is named in the
connection's ``application_name``, so a refusal says who holds it. A tracking *server*
(``http://``) has no database to lock from here: its job lock stays a lock file per host.

The OS drops a ``flock`` when its process dies, even on SIGKILL, so a stale lock never blocks a
restart; and holding the job lock proves that no other job on this host is live, which is what
lets :mod:`monitoring.orphans` mark RUNNING improve runs as killed. A ``flock`` taken on a second
descriptor of the same file conflicts even inside one process, so code already holding the job
lock (the daemon's in-process job, ``improve.run``) must never take it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from imgsearch.config import home_dir
from imgsearch.errors import DaemonAlreadyRunning

JOB_LOCK = "improve"
_DEFAULT_PORTS = {
    "http": 80,
    "https": 443,
    "postgresql": 5432,
    "postgres": 5432,
    "mysql": 3306,
    "mssql": 1433,
}


class JobAlreadyRunning(DaemonAlreadyRunning):
    """Another improve job (the daemon, or a run by hand) holds the lock of this tracking store."""


def _local_path(url: str) -> Path | None:
    """The file (or folder) behind a SQLite or file-store URL, resolved; None for a server URL."""
    if url.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        if database in (None, "", ":memory:"):
            return None
        return Path(str(database)).expanduser().resolve()
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(parts.path).expanduser().resolve()
    if parts.scheme == "":
        return Path(url).expanduser().resolve()  # a plain path: MLflow's file store
    return None


def store_key(url: str) -> str:
    """A canonical name of the store ``url`` points at (see the module docstring).

    ``sqlite:///a/../b.db`` -> ``sqlite:////abs/b.db``; ``mlruns`` -> ``file:///abs/mlruns``;
    ``postgresql+psycopg2://u:pw@DB.host/mlflow?x=1`` -> ``postgresql://db.host:5432/mlflow``.
    """
    path = _local_path(url)
    if path is not None:
        return f"sqlite:///{path}" if url.startswith("sqlite:") else f"file://{path}"
    if url.startswith("sqlite:"):
        return "sqlite://:memory:"
    parts = urlsplit(url)
    scheme = parts.scheme.lower().split("+", 1)[0]
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or _DEFAULT_PORTS.get(scheme)
    host = (parts.hostname or "").lower()
    netloc = f"{host}:{port}" if port else host
    return f"{scheme}://{netloc}/{parts.path.strip('/')}"


def lock_path(url: str, name: str | None = None) -> Path:
    """The lock file of the store ``url``: ``<file>[.<name>].lock`` next to a local store, else
    ``<home>/<name or 'daemon'>-<sha256 of the key>.lock``."""
    path = _local_path(url)
    suffix = f".{name}.lock" if name else ".lock"
    if path is not None:
        return path.with_name(path.name + suffix)
    digest = hashlib.sha256(store_key(url).encode()).hexdigest()[:16]
    return home_dir() / f"{name or 'daemon'}-{digest}.lock"


@contextlib.contextmanager
def hold(
    path: Path,
    holder: str,
    refusal: str,
    error: type[DaemonAlreadyRunning] = DaemonAlreadyRunning,
) -> Iterator[Path]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` for the life of the context.

    ``holder`` is written into the file (after the pid) so a refused process can name who holds
    it; ``refusal`` ends the error message. Raises ``error`` (a :class:`DaemonAlreadyRunning`)
    naming the holder's pid when another descriptor holds the lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the life of the context
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.seek(0)
            found = handle.read().strip() or "unknown"
            raise error(f"{found} holds {path}; {refusal}") from exc
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({holder})")
        handle.flush()
        yield path
    finally:
        handle.close()  # closing the descriptor releases the lock


def is_postgres(url: str) -> bool:
    """Whether ``url`` is a PostgreSQL database URL (any driver: ``postgresql+psycopg2://``)."""
    scheme = urlsplit(url).scheme.lower().split("+", 1)[0]
    return scheme in ("postgresql", "postgres")


def advisory_key(name: str, url: str) -> tuple[int, int]:
    """The two 31-bit keys of the advisory lock ``name`` of the store ``url`` (stable per store)."""
    digest = hashlib.sha256(f"imgsearch:{name}:{store_key(url)}".encode()).digest()
    return (
        int.from_bytes(digest[:4], "big") & 0x7FFFFFFF,
        int.from_bytes(digest[4:8], "big") & 0x7FFFFFFF,
    )


_HOLDER_SQL = """
SELECT a.application_name, a.client_addr, a.pid FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.classid::bigint = :k1 AND l.objid::bigint = :k2
"""


@contextlib.contextmanager
def advisory_lock(
    url: str,
    name: str,
    holder: str,
    refusal: str,
    error: type[DaemonAlreadyRunning] = DaemonAlreadyRunning,
) -> Iterator[str]:
    """Hold PostgreSQL advisory lock ``name`` of the database ``url`` for the life of the context.

    Non-blocking: raises ``error`` naming the holder (its ``application_name``: host, pid, role)
    when another session holds it. Yields a description of the lock.
    """
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    k1, k2 = advisory_key(name, url)
    who = f"imgsearch {holder} pid {os.getpid()} on {socket.gethostname()}"[:63]
    engine = sqlalchemy.create_engine(
        url, poolclass=NullPool, connect_args={"application_name": who}
    )
    conn: Any = None
    try:
        conn = engine.connect()
        params = {"k1": k1, "k2": k2}
        got = conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k1, :k2)"), params)
        if not got.scalar():
            row = conn.execute(sqlalchemy.text(_HOLDER_SQL), params).first()
            found = f"{row[0] or 'a session'} (backend pid {row[2]})" if row else "another session"
            raise error(f"{found} holds advisory lock {name} of {store_key(url)}; {refusal}")
        conn.commit()
        try:
            yield f"{store_key(url)} advisory lock {name} ({k1}, {k2})"
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k1, :k2)"), params)
            conn.commit()
    finally:
        if conn is not None:
            conn.close()  # closing the session would release the lock too
        engine.dispose()


@contextlib.contextmanager
def store_lock(
    url: str,
    name: str | None,
    holder: str,
    refusal: str,
    error: type[DaemonAlreadyRunning] = DaemonAlreadyRunning,
    path: Path | None = None,
) -> Iterator[str]:
    """The lock of store ``url``: an advisory lock in it when it is PostgreSQL (and no explicit
    ``path`` is given), else the lock file ``path`` (default :func:`lock_path`)."""
    if path is None and is_postgres(url):
        with advisory_lock(url, name or "daemon", holder, refusal, error) as what:
            yield what
        return
    with hold(path or lock_path(url, name), holder, refusal, error) as held:
        yield str(held)


def tracking_uri() -> str:
    """The MLflow tracking store this process writes to (``MLFLOW_TRACKING_URI`` or the default)."""
    import mlflow

    return str(mlflow.get_tracking_uri())


@contextlib.contextmanager
def job_lock(url: str | None = None, *, holder: str | None = None) -> Iterator[str]:
    """Hold the improve job lock of the tracking store ``url`` (default: this process's store).

    Raises :class:`JobAlreadyRunning` (exit status 3 in the CLIs) when the daemon or a hand run
    already holds it, on any spelling of the same store. A PostgreSQL tracking store is locked
    in the database (advisory lock), any other with a lock file.
    """
    url = url or tracking_uri()
    who = holder or " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]).strip() or "python"
    with store_lock(
        url,
        JOB_LOCK,
        who,
        f"one improve job per tracking store ({store_key(url)}): the daemon or a hand run of "
        "monitoring.improve is already working on it",
        JobAlreadyRunning,
    ) as path:
        yield path
