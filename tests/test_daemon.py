"""The daemon's mechanics: one daemon per store, persisted job options, --once, coalescing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

from imgsearch.errors import ConfigError
from monitoring import daemon, lock

ROOT = Path(__file__).resolve().parent.parent
CALLS_ENV = "IMGSEARCH_TEST_DAEMON_CALLS"


def record_call(tag: str = "", sleep: float = 0.0) -> None:
    """The test job: append one line per call to the file named by ``$IMGSEARCH_TEST_DAEMON_CALLS``."""
    Path(os.environ[CALLS_ENV] + ".started").touch()
    time.sleep(sleep)
    with open(os.environ[CALLS_ENV], "a") as f:
        f.write(f"{tag}\n")


def calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> daemon.DaemonConfig:
    """A job store in ``tmp_path``; the tracking store (the job lock, orphans) private too."""
    monkeypatch.setenv(CALLS_ENV, str(tmp_path / "calls.txt"))
    return daemon.DaemonConfig(
        jobstore_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        job="tests.test_daemon:record_call",
        job_kwargs={"tag": "x"},
        interval_minutes=10,
        misfire_grace_time=7200,
    )


def test_lock_refuses_a_second_daemon_in_another_process(
    cfg: daemon.DaemonConfig, tmp_path: Path
) -> None:
    lock = daemon.lock_path_for(cfg)
    assert lock == tmp_path / "jobs.db.lock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from monitoring.daemon import daemon_lock\n"
            "with daemon_lock(Path(sys.argv[1])):\n"
            "    print('locked', flush=True); time.sleep(60)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(daemon.DaemonAlreadyRunning, match=str(holder.pid)):
            with daemon.daemon_lock(lock):
                pass
        # the real entry point, as a second daemon on the same store, refuses and exits
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "monitoring.daemon",
                "run",
                "--jobstore-url",
                cfg.url,
                "--job",
                cfg.job,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=120,
        )
        assert second.returncode == daemon.EXIT_LOCKED, second.stderr
        assert "refusing to start" in second.stderr
    finally:
        holder.kill()
        holder.wait()
    # the OS released the killed holder's lock: a new daemon may start
    with daemon.daemon_lock(lock):
        pass


def test_job_options_read_back_from_the_store(cfg: daemon.DaemonConfig) -> None:
    for _ in range(2):  # registering twice replaces under the stable id, never duplicates
        scheduler = daemon.make_scheduler(cfg)
        daemon.register_job(scheduler, cfg)
        scheduler.start(paused=True)
        scheduler.shutdown(wait=False)
    store = SQLAlchemyJobStore(url=cfg.url)
    try:
        jobs = store.get_all_jobs()
    finally:
        store.shutdown()
    assert [j.id for j in jobs] == ["imgsearch-improve"]
    job = jobs[0]
    assert job.func_ref == "tests.test_daemon:record_call"
    assert job.coalesce is True
    assert job.max_instances == 1
    assert job.misfire_grace_time == 7200
    assert job.kwargs == {"tag": "x"}
    assert job.trigger.interval == timedelta(minutes=10)


def test_restart_keeps_the_stored_next_run(cfg: daemon.DaemonConfig) -> None:
    scheduler = daemon.make_scheduler(cfg)
    first = daemon.register_job(scheduler, cfg)
    scheduler.start(paused=True)
    stored = scheduler.get_job(first.id).next_run_time
    scheduler.shutdown(wait=False)
    time.sleep(0.05)
    scheduler = daemon.make_scheduler(cfg)
    daemon.register_job(scheduler, cfg)
    scheduler.start(paused=True)
    try:
        assert scheduler.get_job(first.id).next_run_time == stored
    finally:
        scheduler.shutdown(wait=False)


def test_once_calls_the_job_once(cfg: daemon.DaemonConfig, tmp_path: Path) -> None:
    assert daemon.serve(cfg, once=True) == 0
    assert calls(tmp_path / "calls.txt") == ["x"]
    # and through the CLI (config from configs/daemon.yaml, overridden by flags)
    code = daemon.main(
        ["run", "--once", "--jobstore-url", cfg.url, "--job", "tests.test_daemon:record_call"]
    )
    assert code == 0 and calls(tmp_path / "calls.txt") == ["x", ""]
    # the job's keyword arguments from the command line (YAML)
    code = daemon.main(
        ["run", "--once", "--jobstore-url", cfg.url, "--job", cfg.job, "--job-kwargs", "{tag: y}"]
    )
    assert code == 0 and calls(tmp_path / "calls.txt") == ["x", "", "y"]


def test_clock_jump_past_several_fire_times_runs_once(
    cfg: daemon.DaemonConfig, tmp_path: Path
) -> None:
    """The store says the job was due 55 minutes ago (six 10-minute fire times missed, within the
    misfire grace): on start, coalescing runs it once and schedules the next run in the future."""
    scheduler = daemon.make_scheduler(cfg)
    past = datetime.now(timezone.utc) - timedelta(minutes=55)
    job = scheduler.add_job(
        cfg.job,
        daemon.make_trigger(cfg),
        id=cfg.job_id,
        kwargs={"tag": "jump"},
        replace_existing=True,
        coalesce=True,
        max_instances=1,
        misfire_grace_time=cfg.misfire_grace_time,
        next_run_time=past,
    )
    assert len(job._get_run_times(datetime.now(timezone.utc))) == 6  # six fire times missed
    scheduler.start()
    try:
        deadline = time.monotonic() + 20
        while not calls(tmp_path / "calls.txt") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # any further (uncoalesced) run would have been submitted by now
        nxt = scheduler.get_job(cfg.job_id).next_run_time
    finally:
        scheduler.shutdown(wait=True)
    assert calls(tmp_path / "calls.txt") == ["jump"]
    assert nxt > datetime.now(timezone.utc)


def test_sigterm_waits_for_the_running_job(cfg: daemon.DaemonConfig, tmp_path: Path) -> None:
    """A stop request during a run lets the run finish, then the daemon returns."""
    stop = threading.Event()
    cfg.job_kwargs = {"tag": "slow", "sleep": 1.5}
    cfg.interval_minutes = 0.02  # first run 1.2 s after start
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(daemon.serve(cfg, stop=stop)), daemon=True
    )
    thread.start()
    started = Path(str(tmp_path / "calls.txt") + ".started")
    deadline = time.monotonic() + 20
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists()
    stop.set()  # the job is running now (it sleeps 1.5 s)
    thread.join(timeout=30)
    assert result == [0]
    assert calls(tmp_path / "calls.txt") == ["slow"]  # it finished, it was not cut short


def test_bad_config_raises() -> None:
    with pytest.raises(ConfigError):
        daemon.DaemonConfig(trigger="weekly")
    with pytest.raises(ConfigError):
        daemon.DaemonConfig(job_kwargs="tag")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        daemon.make_trigger(daemon.DaemonConfig(trigger="cron", cron="not a cron"))
    assert "cron" in type(daemon.make_trigger(daemon.DaemonConfig(trigger="cron"))).__name__.lower()


def test_improve_decision() -> None:
    from monitoring.improve import decide

    assert decide(False, 0, 0, 500)[0] == "skip"
    assert decide(True, 10, 0, 500)[0] == "improve"
    assert decide(False, 500, 0, 500)[0] == "improve"
    assert decide(False, 499, 0, 500)[0] == "wait"


# --- the lock is keyed on the resolved store (issue 17.6) ----------------------------------------


def _spellings(tmp_path: Path) -> tuple[Path, str, str]:
    """``real/mlflow.db`` spelled through a symlinked folder and ``..``, and relative to the cwd."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    via_link = f"sqlite:///{tmp_path}/link/../link/mlflow.db"
    relative = "sqlite:///real/mlflow.db"  # the cwd is tmp_path (mlflow_store)
    return real / "mlflow.db", via_link, relative


def test_store_key_resolves_sqlite_paths_and_normalises_server_urls(
    tmp_path: Path, mlflow_store: str
) -> None:
    db, via_link, relative = _spellings(tmp_path)
    assert lock.store_key(via_link) == lock.store_key(relative) == f"sqlite:///{db}"
    assert lock.lock_path(via_link, "improve") == lock.lock_path(relative, "improve")
    assert lock.lock_path(relative, "improve") == db.with_name("mlflow.db.improve.lock")
    other = lock.store_key(f"sqlite:///{tmp_path / 'other.db'}")
    assert other != lock.store_key(relative)
    pg = lock.store_key("postgresql+psycopg2://bob:s3cret@DB.example.com/mlflow?sslmode=require")
    assert pg == lock.store_key("postgresql://alice@db.example.com:5432/mlflow/")
    assert pg == "postgresql://db.example.com:5432/mlflow" and "s3cret" not in pg
    assert pg != lock.store_key("postgresql://db.example.com/other")
    assert lock.store_key("http://Tracking:80") == lock.store_key("http://tracking/")
    # the daemon's job-store lock goes through the same key
    a = daemon.lock_path_for(daemon.DaemonConfig(jobstore_url=via_link))
    assert a == daemon.lock_path_for(daemon.DaemonConfig(jobstore_url=relative))
    assert a == db.with_name("mlflow.db.lock")


def test_two_spellings_of_one_store_share_the_lock(tmp_path: Path, mlflow_store: str) -> None:
    db, via_link, relative = _spellings(tmp_path)
    with lock.job_lock(via_link, holder="first"):
        with pytest.raises(lock.JobAlreadyRunning, match=f"pid {os.getpid()} \\(first\\)"):
            with lock.job_lock(relative):
                pass
        with pytest.raises(daemon.DaemonAlreadyRunning):  # what the CLIs catch (exit 3)
            with lock.job_lock(f"sqlite:///{db}"):
                pass
        with lock.job_lock(f"sqlite:///{tmp_path / 'other.db'}"):  # another store: free
            pass
    with lock.job_lock(relative):  # released on exit
        pass


def test_a_hand_run_of_improve_is_refused_while_the_daemon_runs(
    cfg: daemon.DaemonConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The daemon holds the tracking store's job lock for its life: ``monitoring.improve`` by hand,
    in another process and through another spelling of the store, exits with status 3."""
    from monitoring import improve

    stop = threading.Event()
    thread = threading.Thread(target=lambda: daemon.serve(cfg, stop=stop), daemon=True)
    thread.start()
    path = lock.lock_path(lock.tracking_uri(), lock.JOB_LOCK)
    try:
        deadline = time.monotonic() + 20
        while "daemon" not in (path.read_text() if path.exists() else ""):
            assert time.monotonic() < deadline, "the daemon never took the job lock"
            time.sleep(0.05)
        (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/link/mlflow.db",
        }
        hand = subprocess.run(
            [sys.executable, "-m", "monitoring.improve", "--profile", "ci"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=300,
        )
        assert hand.returncode == daemon.EXIT_LOCKED, hand.stderr
        assert "refusing to start" in hand.stderr and "(daemon)" in hand.stderr
        assert improve.main(["--profile", "ci"]) == daemon.EXIT_LOCKED  # in-process too
        assert "one improve job per tracking store" in capsys.readouterr().err
        assert "improve job: running" in daemon.status(cfg)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert "improve job: none running" in daemon.status(cfg)


def test_a_daemon_is_refused_while_a_hand_run_works(
    cfg: daemon.DaemonConfig, tmp_path: Path, capsys: Any
) -> None:
    with lock.job_lock(holder="monitoring.improve by hand"):
        code = daemon.main(["run", "--once", "--jobstore-url", cfg.url, "--job", cfg.job])
    assert code == daemon.EXIT_LOCKED
    assert "refusing to start" in capsys.readouterr().err
    assert calls(tmp_path / "calls.txt") == []  # the job never ran


# --- orphans: runs a SIGKILLed job left RUNNING are marked KILLED at start -----------------------


def make_orphans(experiment: str) -> dict[str, str]:
    """By hand, in ``experiment`` (get-or-create): what a SIGKILLed improve job leaves behind (a
    RUNNING parent, child and grandchild), a finished improve run, and an unrelated RUNNING run."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    exp = found.experiment_id if found else client.create_experiment(experiment)
    stage = "imgsearch.stage"
    parent = client.create_run(exp, tags={stage: "improve"}, run_name="improve").info.run_id
    child = client.create_run(
        exp, tags={stage: "index", "mlflow.parentRunId": parent}, run_name="index_add"
    ).info.run_id
    grandchild = client.create_run(
        exp, tags={stage: "evaluate", "mlflow.parentRunId": child}, run_name="evaluate"
    ).info.run_id
    done = client.create_run(exp, tags={stage: "improve"}).info.run_id
    client.set_tag(done, "imgsearch.improve.decision", "skip")
    client.set_terminated(done, "FINISHED")
    other = client.create_run(exp, tags={stage: "main"}, run_name="main").info.run_id
    return {"parent": parent, "child": child, "grandchild": grandchild, "done": done,
            "other": other}  # fmt: skip


def assert_marked(runs: dict[str, str], context: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for name in ("parent", "child", "grandchild"):
        run = client.get_run(runs[name])
        assert run.info.status == "KILLED", name
        assert run.info.end_time is not None
        assert run.data.tags["imgsearch.improve.decision"] == "killed"
        why = run.data.tags["imgsearch.improve.killed_reason"]
        assert why.startswith(f"orphaned: found RUNNING at {context} 20"), why
    assert client.get_run(runs["parent"]).data.tags["imgsearch.improve.reason"] == why
    done = client.get_run(runs["done"])
    assert done.info.status == "FINISHED"
    assert done.data.tags["imgsearch.improve.decision"] == "skip"
    other = client.get_run(runs["other"])  # not the lock's business: left alone
    assert other.info.status == "RUNNING"
    assert "imgsearch.improve.decision" not in other.data.tags


def test_daemon_start_marks_orphaned_improve_runs_killed(
    cfg: daemon.DaemonConfig, tmp_path: Path
) -> None:
    runs = make_orphans(f"improve-orphans-{tmp_path.name}")
    assert "decision=?" in daemon.status(cfg)
    assert daemon.serve(cfg, once=True) == 0
    assert_marked(runs, "daemon start")
    text = daemon.status(cfg)
    assert f"{runs['parent']} KILLED decision=killed" in text
    assert "decision=?" not in text
    assert "reason=orphaned: found RUNNING at daemon start" in text
    assert calls(tmp_path / "calls.txt") == ["x"]  # and the job ran
