"""Against a real MLflow tracking server on PostgreSQL and a PostgreSQL job store (issue 15 §3).

``.ci/run`` starts both (``.ci/services.sh``: a throwaway PostgreSQL cluster and ``mlflow server``
with the PostgreSQL backend store and served artifacts) and exports
``IMGSEARCH_TEST_TRACKING_URI`` (``http://127.0.0.1:PORT``) and ``IMGSEARCH_TEST_PG_URL`` (a
database for the APScheduler job store). Without them these tests are skipped, unless
``IMGSEARCH_REQUIRE_SERVER=1`` (set by ``.ci/run``) makes that a failure. By hand::

    source .ci/services.sh && start_services && pytest -q tests/test_tracking_server.py; stop_services
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import sqlalchemy
import yaml
from mlflow import MlflowClient

from imgsearch.search.ranking import RankingConfig
from monitoring import daemon
from monitoring import lock as locks
from registry.register import INPUT_EXTRACT_RUN, INPUT_SPLIT_RUN
from tests.conftest import make_folder_catalog
from tests.test_registry import make_extractor_dir, make_index_dir, png_bytes

ROOT = Path(__file__).resolve().parent.parent
URI_ENV, PG_ENV, REQUIRE_ENV = (
    "IMGSEARCH_TEST_TRACKING_URI",
    "IMGSEARCH_TEST_PG_URL",
    "IMGSEARCH_REQUIRE_SERVER",
)


def _need(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        reason = f"${name} is not set: no tracking server / PostgreSQL (.ci/run starts them)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
    return value


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Tracking and registry over HTTP at the test server; a private home and working dir."""
    uri = _need(URI_ENV)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # set_experiment keeps the id in a module global; restore it at teardown, or later tests'
    # fluent runs go to an experiment id that their own stores do not have
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    experiment = mlflow.set_experiment(f"server-test-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment.experiment_id)
    yield uri


@pytest.fixture
def pg_url() -> str:
    return _need(PG_ENV)


def test_register_and_promote_steps_on_the_server(server: str, tmp_path: Path) -> None:
    """The register and promote steps over HTTP: models, tags and aliases live in PostgreSQL,
    artifacts behind the server; the champion loads back through ``models:/``."""
    from steps import promote as promote_step
    from steps import register as register_step

    suffix = uuid.uuid4().hex[:8]
    names = {"extractor": f"srv-{suffix}-extractor", "index": f"srv-{suffix}-index"}
    ext_dir = make_extractor_dir(tmp_path / "extractor", seed=0)
    images = [png_bytes(i) for i in range(6)]
    index_dir = make_index_dir(tmp_path / "index", ext_dir, images)
    with mlflow.start_run(run_name="extract") as extract_run:
        mlflow.log_artifacts(str(ext_dir), "extractor")
    inputs = {INPUT_EXTRACT_RUN: extract_run.info.run_id, INPUT_SPLIT_RUN: "split-run"}
    with mlflow.start_run(run_name="index") as index_run:
        mlflow.set_tags(inputs)
        mlflow.log_artifacts(str(index_dir), "index")
        ranking = dataclasses.asdict(RankingConfig(popularity_weight=0.05))
        mlflow.log_text(yaml.safe_dump(ranking), "ranking.yaml")
    with mlflow.start_run(run_name="evaluate") as evaluate_run:
        mlflow.set_tags(inputs)
        mlflow.log_params({"split": "test"})
        mlflow.log_metrics({"map_at_r": 0.42, "hit_at_1": 0.9})
        pd.DataFrame({"image_id": ["img1"], "ap": [1.0]}).to_parquet(tmp_path / "pq.parquet")
        mlflow.log_artifact(str(tmp_path / "pq.parquet"), "")
    ids = (extract_run.info.run_id, index_run.info.run_id, evaluate_run.info.run_id)
    overrides = {
        "register.extractor_name": names["extractor"],
        "register.index_name": names["index"],
    }

    register_step.run(*ids, overrides=overrides)
    register_step.run(*ids, overrides=overrides)  # a retry finds its version: no new one
    client = MlflowClient()
    assert len(client.search_model_versions(f"name = '{names['index']}'")) == 1
    promote_run = promote_step.run(
        overrides={
            "promote.index_name": names["index"],
            "promote.extractor_name": names["extractor"],
        }
    )
    tags = client.get_run(promote_run).data.tags
    assert tags["promote.promoted"] == "true", tags.get("promote.reason")
    idx = client.get_model_version_by_alias(names["index"], "champion")
    ext = client.get_model_version_by_alias(names["extractor"], "champion")
    assert idx.tags["extractor_version"] == str(ext.version)
    assert idx.source.startswith(("mlflow-artifacts:", "models:/", "runs:/")), idx.source
    model = mlflow.pyfunc.load_model(f"models:/{names['index']}@champion")
    assert model.metadata is not None


@pytest.mark.slow
def test_ci_profile_chain_on_the_server(server: str, pg_url: str, tmp_path: Path) -> None:
    """``steps.main`` with the ci profile over HTTP: every stage a run on the server, both
    models registered there with a champion; then new data, and the daemon's ``run --once`` of
    the improve job against the server with a PostgreSQL job store."""
    from steps import main
    from tests.test_pipeline import write_texts

    data = make_folder_catalog(tmp_path / "catalog")
    overrides = {
        "ingest.source": "folder",
        "ingest.path": str(data),
        "ingest.texts_path": str(write_texts(tmp_path / "texts.csv")),
        "extract.weights": "none",
        "preprocess.size": 64,
        "eda.thumbnails": 0,
        "evaluate.plots": False,
    }
    parent_id = main.run(profile="ci", overrides=overrides)
    client = MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and "test.map_at_r" in parent.data.metrics
    for name in ("imgsearch-extractor", "imgsearch-index"):
        assert "champion" in client.get_registered_model(name).aliases

    # new drawings arrive; the daemon runs the improve job once (`run --once`), its tracking
    # over HTTP and its job store in PostgreSQL, as a team runs it
    n_new = _add_drawings(data)
    kwargs = yaml.safe_dump({"profile": "ci", "overrides": overrides}, default_flow_style=True)
    home = Path(os.environ["IMGSEARCH_HOME"])
    once = _daemon(["--once", "--jobstore-url", pg_url, "--job-kwargs", kwargs], home)
    _, err = once.communicate(timeout=900)
    assert once.returncode == 0, err[-3000:]
    [job] = client.search_runs(
        [parent.info.experiment_id], "tags.`imgsearch.stage` = 'improve'", max_results=5
    )
    tags, metrics = job.data.tags, job.data.metrics
    assert job.info.status == "FINISHED", tags.get("imgsearch.improve.reason")
    assert metrics["n_new"] == n_new
    assert tags["imgsearch.improve.decision"] in ("improve", "wait"), tags
    # the job's steps are runs on the server; `daemon status` reads them from there
    steps = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{job.info.run_id}'"
    )
    assert {"ingest", "validate", "extract", "drift"} <= {
        r.info.run_name.split(" · ")[0] for r in steps
    }
    status = subprocess.run(
        [sys.executable, "-m", "monitoring.daemon", "status", "--jobstore-url", pg_url],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert f"decision={tags['imgsearch.improve.decision']}" in status.stdout, status.stderr


def _add_drawings(catalog: Path) -> int:
    """Two new drawings of three known items, in a new style (thick outlines on black)."""
    from PIL import Image, ImageDraw

    added = 0
    for k, item in enumerate(("item01", "item02", "item03")):
        for j in range(2):
            img = Image.new("RGB", (64, 64), (0, 0, 40 * k))  # every drawing distinct
            ImageDraw.Draw(img).ellipse(
                (12 + j * 4, 12, 52, 52 - j * 4), outline=(250, 250, 90), width=5
            )
            img.save(catalog / item / f"new{j}.png")
            added += 1
    return added


def _daemon(args: list[str], home: Path, **kw: object) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "IMGSEARCH_HOME": str(home),  # no lock file shared between the two daemons
        "IMGSEARCH_TEST_DAEMON_CALLS": str(home / "calls.txt"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "monitoring.daemon", "run", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stderr=subprocess.PIPE,
        **kw,  # type: ignore[arg-type]
    )


def test_two_daemons_on_a_shared_postgresql_store_refuse_each_other(
    server: str, pg_url: str, tmp_path: Path
) -> None:
    """Two daemons that share no lock file (two homes: two hosts) and one PostgreSQL job store:
    the second is refused by the advisory lock; the job is stored in PostgreSQL."""
    job = ["--jobstore-url", pg_url, "--job", "tests.test_daemon:record_call"]
    first = _daemon(job, tmp_path / "host-a")
    try:
        assert first.stderr is not None
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:
            line = first.stderr.readline()
            seen.append(line)
            if "daemon up" in line or first.poll() is not None:
                break
        assert first.poll() is None, "".join(seen)
        second = _daemon(job, tmp_path / "host-b")
        _, err = second.communicate(timeout=120)
        assert second.returncode == daemon.EXIT_LOCKED, err
        assert "advisory lock" in err and "refusing to start" in err
        # in-process, the same: the lock lives in the database, not in a file
        with pytest.raises(daemon.DaemonAlreadyRunning, match="advisory lock"):
            with daemon.store_lock(daemon.DaemonConfig(jobstore_url=pg_url)):
                pass
        engine = sqlalchemy.create_engine(pg_url)
        with engine.connect() as conn:
            ids = conn.execute(sqlalchemy.text("SELECT id FROM apscheduler_jobs")).scalars().all()
        engine.dispose()
        assert daemon.DaemonConfig().job_id in ids
    finally:
        first.terminate()
        first.wait(timeout=60)
    # the holder's session ended: the lock is free again
    with daemon.store_lock(daemon.DaemonConfig(jobstore_url=pg_url)):
        pass


def test_job_lock_of_a_postgresql_tracking_store_is_an_advisory_lock(pg_url: str) -> None:
    """A tracking store given by its database URL: the improve job lock is taken in PostgreSQL,
    and another spelling of the same store (query arguments) is refused, naming the holder."""
    with locks.job_lock(pg_url, holder="first") as what:
        assert "advisory" in what
        with pytest.raises(locks.JobAlreadyRunning, match="first"):
            with locks.job_lock(pg_url + "?connect_timeout=10", holder="second"):
                pass
    with locks.job_lock(pg_url, holder="third"):
        pass
