"""The continuous-improvement daemon: one APScheduler job, persisted, one daemon per job store.

    python -m monitoring.daemon run            # schedule from configs/daemon.yaml, block until SIGTERM
    python -m monitoring.daemon run --once     # run the job now, in this process, and exit
    python -m monitoring.daemon status         # the job's next run, and the last improve runs

The job (``daemon.job``, default ``monitoring.improve:run``, called with ``daemon.job_kwargs``) is
stored in a SQLAlchemy job store (``daemon.jobstore_url``; default SQLite under
``imgsearch.config.home_dir()``; any SQLAlchemy URL works) under a stable id with
``replace_existing=True``, ``coalesce=True``, ``max_instances=1`` and an explicit
``misfire_grace_time`` (RELIABILITY 13): after a clock jump or downtime past several fire times,
the job runs once. When the configured trigger equals the stored one, the stored next run time is
kept, so a restart neither skips nor repeats a run.

One daemon per job store (RELIABILITY 12), one improve job per MLflow tracking store
(:mod:`monitoring.lock`): for its whole life the daemon holds an exclusive ``fcntl.flock`` on a
lock file next to the resolved SQLite job store (a PostgreSQL job store: an advisory lock in that
database, so daemons on different hosts sharing it refuse each other; another server URL: a lock
file per normalised URL under the home dir, which only guards one host), then the job lock of the tracking store, the one
``python -m monitoring.improve`` takes when run by hand. A second daemon, or a daemon started while
a hand run works, exits with status 3. The OS drops the locks when the process dies, even on
SIGKILL, so a stale lock never blocks a restart. Right after taking them the daemon marks improve
runs a killed job left RUNNING as ``KILLED`` (:mod:`monitoring.orphans`). The job runs in this
process under the daemon's lock and must not take it again (``improve.run`` does not; only
``improve.main`` does).

SIGTERM / SIGINT stop the scheduler from taking new runs and wait for the running job to finish;
a job can poll :func:`stop_requested` between its steps to return early.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from apscheduler.util import ref_to_obj

from imgsearch.config import from_dict, home_dir, load_config
from imgsearch.errors import ConfigError, DaemonAlreadyRunning
from monitoring import lock as locks
from monitoring.orphans import IMPROVE_STAGE, mark_orphans

log = logging.getLogger(__name__)

STAGE = "daemon"
EXIT_LOCKED = 3
_STOP = threading.Event()


@dataclass
class DaemonConfig:
    """Scheduler settings (``configs/daemon.yaml``)."""

    jobstore_url: str | None = None  # None: sqlite:///<home_dir>/scheduler.db
    trigger: str = "interval"  # interval | cron
    interval_minutes: float = 60.0
    cron: str = "0 3 * * *"  # crontab: minute hour day month day_of_week
    timezone: str = "UTC"
    job_id: str = "imgsearch-improve"
    job: str = "monitoring.improve:run"
    job_kwargs: dict[str, Any] = field(default_factory=dict)
    misfire_grace_time: int = 3600  # seconds a late run may still start
    max_instances: int = 1
    lock_path: str | None = None  # None: next to a SQLite store, else under the home dir

    def __post_init__(self) -> None:
        if self.trigger not in ("interval", "cron"):
            raise ConfigError(f"daemon.trigger must be interval or cron, not {self.trigger!r}")
        if self.trigger == "interval" and self.interval_minutes <= 0:
            raise ConfigError("daemon.interval_minutes must be > 0")
        if self.misfire_grace_time <= 0:
            raise ConfigError("daemon.misfire_grace_time must be > 0 (explicit, RELIABILITY 13)")
        if self.max_instances < 1:
            raise ConfigError("daemon.max_instances must be >= 1")
        if not isinstance(self.job_kwargs, dict):
            raise ConfigError(f"daemon.job_kwargs must be a mapping, not {self.job_kwargs!r}")

    @property
    def url(self) -> str:
        return self.jobstore_url or f"sqlite:///{home_dir() / 'scheduler.db'}"


def make_trigger(cfg: DaemonConfig) -> BaseTrigger:
    if cfg.trigger == "cron":
        try:
            return CronTrigger.from_crontab(cfg.cron, timezone=cfg.timezone)
        except ValueError as exc:
            raise ConfigError(f"daemon.cron {cfg.cron!r}: {exc}") from exc
    return IntervalTrigger(minutes=cfg.interval_minutes, timezone=cfg.timezone)


# --- one daemon per store ---------------------------------------------------------------------


def lock_path_for(cfg: DaemonConfig) -> Path:
    """``<db>.lock`` next to the resolved SQLite store; else ``<home>/daemon-<hash of the key>.lock``
    (:func:`monitoring.lock.store_key`: any spelling of the same store gives the same file)."""
    if cfg.lock_path:
        return Path(cfg.lock_path)
    return locks.lock_path(cfg.url)


def daemon_lock(path: Path) -> contextlib.AbstractContextManager[Path]:
    """Hold the daemon's store lock ``path``; raise :class:`DaemonAlreadyRunning` if it is taken."""
    return locks.hold(path, "daemon", "one daemon per job store")


def store_lock(cfg: DaemonConfig, holder: str = "daemon") -> contextlib.AbstractContextManager[str]:
    """The daemon's lock of its job store: an advisory lock in a PostgreSQL job store (daemons on
    different hosts sharing it refuse each other), else the lock file :func:`lock_path_for`."""
    return locks.store_lock(
        cfg.url,
        None,
        holder,
        "one daemon per job store",
        path=Path(cfg.lock_path) if cfg.lock_path else None,
    )


# --- the scheduler ---------------------------------------------------------------------------


def make_scheduler(cfg: DaemonConfig) -> BackgroundScheduler:
    return BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=cfg.url)},
        executors={"default": {"type": "threadpool", "max_workers": 1}},
        job_defaults={
            "coalesce": True,
            "max_instances": cfg.max_instances,
            "misfire_grace_time": cfg.misfire_grace_time,
        },
        timezone=cfg.timezone,
    )


def register_job(scheduler: BackgroundScheduler, cfg: DaemonConfig) -> Any:
    """Add (or replace) the job under its stable id; keep the stored next run on the same trigger."""
    trigger = make_trigger(cfg)
    options: dict[str, Any] = {}
    store = SQLAlchemyJobStore(url=cfg.url)
    try:
        existing = store.lookup_job(cfg.job_id)
    except Exception:  # the table does not exist yet, or holds a job whose func no longer imports
        existing = None
    finally:
        store.shutdown()
    if existing is not None and str(existing.trigger) == str(trigger):
        options["next_run_time"] = existing.next_run_time
    return scheduler.add_job(
        cfg.job,
        trigger,
        id=cfg.job_id,
        name=cfg.job_id,
        kwargs=dict(cfg.job_kwargs),
        replace_existing=True,
        coalesce=True,
        max_instances=cfg.max_instances,
        misfire_grace_time=cfg.misfire_grace_time,
        **options,
    )


def stop_requested() -> bool:
    """True once the daemon was asked to stop (SIGTERM/SIGINT): jobs check it between steps."""
    return _STOP.is_set()


def _on_signal(signum: int, _frame: Any) -> None:
    log.info("signal %d: stopping after the current run", signum)
    _STOP.set()
    # under ``python -m`` this module is __main__; jobs poll the importable module's event
    from monitoring import daemon as importable

    importable._STOP.set()


def run_once(cfg: DaemonConfig) -> Any:
    """Call the job now in this process (``--once``)."""
    func = ref_to_obj(cfg.job)
    log.info("running %s once", cfg.job)
    return func(**cfg.job_kwargs)


def serve(cfg: DaemonConfig, once: bool = False, stop: threading.Event | None = None) -> int:
    """Hold the lock, then run once or schedule until ``stop`` (SIGTERM/SIGINT) is set."""
    stop = stop or _STOP
    with store_lock(cfg), locks.job_lock(holder="daemon"):
        mark_orphans(context="daemon start")
        if once:
            run_once(cfg)
            return 0
        scheduler = make_scheduler(cfg)
        job = register_job(scheduler, cfg)
        scheduler.start()
        log.info("daemon up: job %s, next run %s, store %s", job.id, job.next_run_time, cfg.url)
        try:
            while not stop.wait(1.0):
                pass
        finally:
            scheduler.shutdown(wait=True)  # the running job finishes; no new run starts
            log.info("daemon stopped")
    return 0


# --- status -----------------------------------------------------------------------------------


def status(cfg: DaemonConfig, last: int = 10) -> str:
    """The stored job (trigger, next run) and the last ``improve`` runs with their decisions."""
    lines = [f"job store: {cfg.url}"]
    store = SQLAlchemyJobStore(url=cfg.url)
    try:
        from sqlalchemy import inspect

        scheduled = inspect(store.engine).has_table(store.jobs_t.name, schema=store.jobs_t.schema)
        job = store.lookup_job(cfg.job_id) if scheduled else None
    except Exception as exc:
        job = None
        lines.append(f"job {cfg.job_id}: unreadable ({exc})")
    finally:
        store.shutdown()
    if job is not None:
        lines.append(
            f"job {job.id}: {job.func_ref} trigger={job.trigger} next_run={job.next_run_time} "
            f"coalesce={job.coalesce} max_instances={job.max_instances} "
            f"misfire_grace_time={job.misfire_grace_time}"
        )
    elif len(lines) == 1:
        lines.append(f"job {cfg.job_id}: not scheduled")
    try:
        with store_lock(cfg, "daemon status"):
            lines.append("daemon: not running")
    except DaemonAlreadyRunning as exc:
        lines.append(f"daemon: running ({exc})")
    try:
        with locks.job_lock(holder="daemon status"):
            lines.append(f"improve job: none running on {locks.store_key(locks.tracking_uri())}")
    except DaemonAlreadyRunning as exc:
        lines.append(f"improve job: running ({exc})")

    import mlflow

    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`imgsearch.stage` = '{IMPROVE_STAGE}'",
        order_by=["attributes.start_time DESC"],
        max_results=last,
        output_format="list",
    )
    lines.append(f"last {len(runs)} {IMPROVE_STAGE} runs:")
    for r in runs:
        tags = r.data.tags
        started = datetime.fromtimestamp(r.info.start_time / 1000).isoformat(timespec="seconds")
        lines.append(
            f"  {started} {r.info.run_id} {r.info.status} "
            f"decision={tags.get('imgsearch.improve.decision', '?')} "
            f"promoted={tags.get('imgsearch.improve.promoted', '?')} "
            f"index_extended={tags.get('imgsearch.improve.index_extended', '?')} "
            f"reason={tags.get('imgsearch.improve.reason', '')}"
        )
    return "\n".join(lines)


def load(profile: str | None = None, overrides: dict[str, Any] | None = None) -> DaemonConfig:
    return from_dict(DaemonConfig, load_config(profile, overrides).get(STAGE))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default="run", choices=("run", "status"))
    parser.add_argument("--once", action="store_true", help="run the job now and exit")
    parser.add_argument("--profile", default="", help="config profile (configs/profiles/NAME.yaml)")
    parser.add_argument("--jobstore-url", default="", help="SQLAlchemy URL of the job store")
    parser.add_argument("--job", default="", help="job function, module:function")
    parser.add_argument(
        "--job-kwargs",
        default="",
        help="the job's keyword arguments as YAML, e.g. '{overrides: {demo.limit: 200}}'",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load(
        args.profile or None,
        {
            "daemon.jobstore_url": args.jobstore_url,
            "daemon.job": args.job,
            "daemon.job_kwargs": args.job_kwargs,
        },
    )
    if args.command == "status":
        print(status(cfg))
        return 0
    if not args.once:
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    try:
        return serve(cfg, once=args.once)
    except DaemonAlreadyRunning as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        return EXIT_LOCKED


if __name__ == "__main__":
    sys.exit(main())
