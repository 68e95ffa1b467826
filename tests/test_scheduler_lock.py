"""The scheduler's promises (issue 17 point 6): one job per store however it is spelled, hand
runs take the daemon's lock, orphaned runs are marked killed at the next start."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from imgsearch.errors import DaemonAlreadyRunning
from monitoring import daemon, improve
from monitoring.lock import hold, lock_path, store_key
from monitoring.orphans import mark_orphans


def test_one_store_however_spelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    spellings = [
        f"sqlite:///{real}/jobs.db",
        f"sqlite:///{tmp_path}/link/../link/jobs.db",
        "sqlite:///link/jobs.db",
        "sqlite:///./real/../real/jobs.db",
    ]
    assert len({store_key(u) for u in spellings}) == 1
    assert len({lock_path(u) for u in spellings}) == 1
    with hold(lock_path(spellings[0])):
        for other in spellings[1:]:
            with pytest.raises(DaemonAlreadyRunning):
                with hold(lock_path(other)):
                    pass
        with hold(lock_path(f"sqlite:///{real}/other.db")):  # another store: its own lock
            pass
    a = store_key("postgresql+psycopg://alice:secret@DB.example:5432/ml")
    assert a == store_key("postgresql://bob@db.example/ml") and "secret" not in a
    assert a != store_key("postgresql://bob@db.example/other")


def test_a_hand_improve_run_takes_the_daemons_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path))
    lock = daemon.lock_path_for(daemon.load())
    assert lock == tmp_path / "scheduler.db.lock"

    def must_not_run(*args: object, **kwargs: object) -> str:
        raise AssertionError("improve ran while the daemon held the lock")

    monkeypatch.setattr(improve, "run", must_not_run)
    with hold(lock):  # the daemon, up
        assert improve.main([]) == daemon.EXIT_LOCKED
    assert "refusing to start" in capsys.readouterr().err


def test_orphaned_improve_runs_are_marked_killed(mlflow_store: str) -> None:
    client = MlflowClient()
    exp = client.create_experiment(f"improve-orphans-{os.getpid()}-{id(client)}")
    parent = client.create_run(exp, tags={"imgsearch.stage": "improve"})
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id})
    done = client.create_run(exp, tags={"imgsearch.stage": "improve"})
    client.set_terminated(done.info.run_id, "FINISHED")
    marked = mark_orphans("found RUNNING at daemon start (test)")
    assert set(marked) == {parent.info.run_id, child.info.run_id}
    got = mlflow.get_run(parent.info.run_id)
    assert got.info.status == "KILLED"
    assert got.data.tags["imgsearch.improve.decision"] == "killed"
    assert "orphaned" in got.data.tags["imgsearch.improve.killed_reason"]
    assert mlflow.get_run(child.info.run_id).info.status == "KILLED"
    assert mlflow.get_run(done.info.run_id).info.status == "FINISHED"
    cfg = daemon.DaemonConfig(jobstore_url=f"sqlite:///{Path(mlflow_store.split(':///')[-1]).parent / 'jobs.db'}")
    assert "decision=killed" in daemon.status(cfg)
