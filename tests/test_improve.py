"""The continuous-improvement job end to end, on a tiny synthetic catalog (32 px, ci profile).

A champion is made once per module by ``steps.main`` (no fine-tuning) on items drawn in one style;
each test copies that state (tracking database, caches, catalog) and adds the same items drawn in
another style (new data that drifts), then runs ``monitoring.improve``. The reliability promises
(RELIABILITY 10, 14; issue 5 part 5) are tests here: a worse challenger is refused, a SIGKILLed job
leaves the champion and the watermark as they were and the next run completes, and a registry
store failing during the gate fails the job with nothing changed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
N_ITEMS = 12
SIZE = 32
COLOURS = [
    (220, 40, 40),
    (40, 170, 60),
    (40, 70, 220),
    (230, 200, 30),
    (150, 50, 190),
    (20, 180, 190),
]


def draw(item: int, view: int, style: str) -> Image.Image:
    """Item ``item``: a polygon (sides and colour from the item); ``view`` shifts it a little.

    ``light``: filled shape on white (the champion's data); ``dark``: the same shape as a thick
    outline in another colour on black (a new vendor's style: the drift to detect).
    """
    sides, colour = 3 + item % 4, COLOURS[item % len(COLOURS)]
    dark = style == "dark"
    img = Image.new("RGB", (SIZE, SIZE), (0, 0, 0) if dark else (255, 255, 255))
    cx, cy, r = 16 + view - 1, 16 + (view % 2), 9 + (item // 4) * 2
    angle = np.pi * item / 5
    pts = [
        (
            cx + r * np.cos(angle + 2 * np.pi * k / sides),
            cy + r * np.sin(angle + 2 * np.pi * k / sides),
        )
        for k in range(sides)
    ]
    d = ImageDraw.Draw(img)
    if dark:
        d.polygon(pts, outline=tuple(255 - c for c in colour), width=3)
    else:
        d.polygon(pts, fill=colour)
    return img


def make_catalog(root: Path, n_items: int = N_ITEMS, views: int = 3) -> Path:
    for i in range(n_items):
        folder = root / f"item{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(views):
            draw(i, j, "light").save(folder / f"light{j}.png")
    return root


def add_new_style(root: Path, n_items: int = N_ITEMS) -> int:
    """A new vendor arrives: one dark drawing of every item. Returns the number of new images."""
    for i in range(n_items):
        draw(i, 1, "dark").save(root / f"item{i:02d}" / "dark.png")
    return n_items


@dataclass
class Template:
    root: Path
    db: Path
    home: Path
    catalog: Path


@dataclass
class Env:
    root: Path
    uri: str
    catalog: Path
    home: Path

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def overrides(self, **extra: Any) -> dict[str, Any]:
        return {**stage_overrides(self.catalog), **extra}


def stage_overrides(catalog: Path) -> dict[str, Any]:
    return {
        "ingest.source": "folder",
        "ingest.path": str(catalog),
        "extract.backbone": "mobilenet_v2",
        "extract.weights": "none",
        "preprocess.size": SIZE,
        "eda.thumbnails": 0,
        "evaluate.plots": False,
        "evaluate.feature_quality": False,
        "drift.report": "none",
        "drift.calibration_trials": 40,
        "index.eval_queries": 50,
    }


def _point_mlflow(uri: str) -> None:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    """The champion: ``steps.main`` without fine-tuning on the light-style catalog (~40 s)."""
    from steps import main

    root = tmp_path_factory.mktemp("improve-template")
    catalog = make_catalog(root / "catalog")
    db, home = root / "mlflow.db", root / "home"
    # mlflow.set_registry_uri() also sets $MLFLOW_REGISTRY_URI, which set_registry_uri(None) keeps:
    # restore it, or later tests read the template's registry (and its champion) through it
    saved = {
        k: os.environ.get(k)
        for k in ("IMGSEARCH_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    cwd = Path.cwd()
    os.environ["IMGSEARCH_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    os.chdir(root)  # ./mlruns (the artifacts) lands in the template folder
    _point_mlflow(f"sqlite:///{db}")
    try:
        main.run(profile="ci", overrides=stage_overrides(catalog), finetune_=False)
        yield Template(root=root, db=db, home=home, catalog=catalog)
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@pytest.fixture()
def env(template: Template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A private copy of the champion's state: database, caches and catalog."""
    shutil.copyfile(template.db, tmp_path / "mlflow.db")
    shutil.copytree(template.home, tmp_path / "home")
    catalog = shutil.copytree(template.catalog, tmp_path / "catalog")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # artifacts keep their absolute location in the copied database
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)  # restored after the test (see template)
    _point_mlflow(uri)
    yield Env(root=tmp_path, uri=uri, catalog=Path(catalog), home=tmp_path / "home")
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def champion(client: MlflowClient) -> tuple[str, str]:
    idx = client.get_model_version_by_alias("imgsearch-index", "champion")
    ext = client.get_model_version_by_alias("imgsearch-extractor", "champion")
    return str(idx.version), str(ext.version)


def watermarks(env: Env) -> list[Path]:
    folder = env.home / "watermarks"
    return sorted(folder.glob("*.json")) if folder.exists() else []


def children(client: MlflowClient, run_id: str) -> dict[str, Any]:
    parent = client.get_run(run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    # runs are named "<step> · <what>" ("newdata · improve"): keyed by the step
    return {r.info.run_name.split(" · ")[0]: r for r in runs}


def improve(env: Env, **extra: Any) -> str:
    from monitoring import improve as job

    return job.run("ci", env.overrides(**extra))


# --- tests -------------------------------------------------------------------------------------


def test_no_champion_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monitoring import improve as job

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    _point_mlflow(uri)
    try:
        run_id = job.run("ci", stage_overrides(make_catalog(tmp_path / "catalog", 2, 2)))
        tags = MlflowClient().get_run(run_id).data.tags
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert tags["imgsearch.improve.decision"] == "skip"
    assert tags["imgsearch.improve.reason"] == "no champion: run main first"
    assert not (tmp_path / "home" / "watermarks").exists()


def test_a_hand_run_marks_orphans_killed_and_takes_the_daemons_lock(
    mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m monitoring.improve``: refused (exit 3) while the job lock of the tracking store
    is held (the daemon holds it); with the lock, runs a killed job left RUNNING become KILLED
    before the job runs."""
    from monitoring import improve as job
    from monitoring.lock import job_lock
    from tests.test_daemon import assert_marked, make_orphans

    runs = make_orphans(f"improve-orphans-{uuid.uuid4().hex[:8]}")
    with job_lock(holder="daemon"):
        assert job.main(["--profile", "ci"]) == 3
    assert "refusing to start" in capsys.readouterr().err
    assert MlflowClient().get_run(runs["parent"]).info.status == "RUNNING"  # refused: untouched

    assert job.main(["--profile", "ci"]) == 0
    assert_marked(runs, "improve start")
    improve_runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.`imgsearch.stage` = 'improve'",
        output_format="list",
    )
    [latest] = [r for r in improve_runs if r.info.run_id not in runs.values()]
    assert latest.data.tags["imgsearch.improve.decision"] == "skip"  # no champion: nothing else


def test_new_style_is_flagged_fine_tuned_gated_then_nothing_new(env: Env) -> None:
    client = env.client()
    before = champion(client)
    n_new = add_new_style(env.catalog)

    run_id = improve(env, **{"improve.on_novel": "improve"})
    run = client.get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["imgsearch.stage"] == "improve"
    assert tags["imgsearch.improve.decision"] == "improve", tags["imgsearch.improve.reason"]
    assert metrics["n_new"] == n_new and metrics["n_already_seen"] == N_ITEMS * 3
    assert metrics["drift_detected"] == 1.0 and metrics["drift_score"] > metrics["drift_threshold"]
    assert metrics["drift_effect"] > 1 and "knn_novel_share" in metrics
    # random-weight 32 px embeddings read the dark style as far from everything (kind novel):
    # on_novel: improve (below) keeps the fine-tuning path under test
    assert tags["imgsearch.improve.drift_kind"] in ("shift", "novel")
    assert " detected (" in tags["imgsearch.improve.reason"]
    assert "imgsearch.improve.alert" not in tags
    steps = children(client, run_id)
    for name in ("ingest", "newdata", "validate", "preprocess", "split", "combine", "extract",
                 "merge", "drift", "trainset", "finetune", "promote"):  # fmt: skip
        assert name in steps, sorted(steps)
        assert steps[name].info.status == "FINISHED"
    assert steps["trainset"].data.metrics["n_train_replay"] > 0
    # the challenger was evaluated on the champion's frozen test split
    assert "before.map_at_r" in metrics and "after.map_at_r" in metrics
    gate = client.get_run(tags["imgsearch.run.promote"]).data.tags
    assert gate["promote.reason"] in tags["imgsearch.improve.reason"]
    assert "different test splits" not in gate["promote.reason"]
    promoted = tags["imgsearch.improve.promoted"] == "true"
    if promoted:  # the gate never blesses a challenger worse on the frozen test split
        assert metrics["after.map_at_r"] >= metrics["before.map_at_r"]
    after = champion(client)
    assert (after != before) == (promoted or tags["imgsearch.improve.index_extended"] == "true")
    summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/summary.json")
    assert summary["decision"] == "improve" and summary["drift"]["verdict"] == "drift"
    assert "## Drift" in mlflow.artifacts.load_text(f"runs:/{run_id}/summary.md")
    [wm] = watermarks(env)
    assert sum(i.endswith("dark.png") for i in mlflow.artifacts.load_dict(
        f"runs:/{run_id}/watermark.json")["seen"]) == n_new  # fmt: skip
    assert wm.exists()

    # nothing new since: skip, and nothing changes
    again = client.get_run(improve(env)).data
    assert again.tags["imgsearch.improve.decision"] == "skip"
    assert again.tags["imgsearch.improve.reason"] == "no new data"
    assert champion(client) == after

    from monitoring import daemon

    text = daemon.status(daemon.DaemonConfig(jobstore_url=f"sqlite:///{env.root / 'jobs.db'}"))
    assert "decision=skip" in text and "decision=improve" in text


def test_a_new_domain_is_served_but_held_for_review(env: Env) -> None:
    """Drift of kind ``novel`` (here: any far new image counts, ``novel_share_max: 0``) with the
    default ``on_novel: review``: ``wait``, an alert tag, the new images added to the served index
    and left untrained; no fine-tuning."""
    client = env.client()
    n_new = add_new_style(env.catalog)
    run_id = improve(env, **{"drift.novel_share_max": 0.0})
    run = client.get_run(run_id)
    tags, metrics = run.data.tags, run.data.metrics
    reason = tags["imgsearch.improve.reason"]
    assert metrics["drift_detected"] == 1.0 and metrics["knn_novel_share"] > 0
    assert tags["imgsearch.improve.drift_kind"] == "novel"
    assert tags["imgsearch.improve.decision"] == "wait", reason
    assert tags["imgsearch.improve.alert"] == "new_domain"
    assert reason.startswith("new domain: ") and "held for review" in reason
    assert "on_novel: improve" in reason
    steps = children(client, run_id)
    assert "finetune" not in steps and "trainset" not in steps
    # the wait path: the new vectors join a copy of the served index ("index · improve add to index")
    assert "index" in steps and "register_index" in steps, sorted(steps)
    assert "**Alert**: new_domain" in mlflow.artifacts.load_text(f"runs:/{run_id}/summary.md")
    assert tags["imgsearch.improve.index_extended"] == "true"
    # the gate's reason names the rule that passed it (not a strict improvement it never checked)
    assert "index extension map_at_r=" in reason and "is not worse than champion" in reason
    # the extended index carries its extractor's precision, as a fully registered one does
    extended = steps["register_index"].data.params["index_version"]
    index_tags = client.get_model_version("imgsearch-index", extended).tags
    extractor_tags = client.get_model_version(
        "imgsearch-extractor", index_tags["extractor_version"]
    ).tags
    assert (
        index_tags["imgsearch.extract.precision"] == extractor_tags["imgsearch.extract.precision"]
    )
    # served, held: not "untrained" (which the next fine-tuning would take without asking)
    wm = mlflow.artifacts.load_dict(f"runs:/{run_id}/watermark.json")
    assert sum(i.endswith("dark.png") for i in wm["held"]) == n_new
    assert not any(i.endswith("dark.png") for i in wm["untrained"])


def _wreck(result: Any) -> Any:
    """Fine-tuning gone wrong: every weight drowned in seeded noise (a much worse extractor)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in result.extractor.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (p.abs().mean() * 50 + 1.0))
    return result


def test_a_worse_challenger_is_refused(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import steps.finetune as finetune_step

    real = finetune_step.finetune
    monkeypatch.setattr(finetune_step, "finetune", lambda *a, **k: _wreck(real(*a, **k)))
    client = env.client()
    before = champion(client)
    add_new_style(env.catalog)
    run_id = improve(
        env, **{"improve.fallback_extend_on_refusal": False, "improve.on_novel": "improve"}
    )
    data = client.get_run(run_id).data
    assert data.tags["imgsearch.improve.decision"] == "improve"
    assert data.metrics["after.map_at_r"] < data.metrics["before.map_at_r"]
    assert data.tags["imgsearch.improve.promoted"] == "false"
    assert "refused" in data.tags["imgsearch.improve.reason"]
    assert "does not beat champion" in data.tags["imgsearch.improve.reason"]
    assert champion(client) == before  # the served pair is untouched
    challenger = client.get_model_version_by_alias("imgsearch-index", "challenger")
    assert str(challenger.version) != before[0]
    assert watermarks(env) == []  # nothing was served: the data is retried next run


def test_registry_down_during_promotion_fails_cleanly(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy.exc

    from monitoring import improve as job
    from registry.promote import RegistryUnavailableError

    client = env.client()
    before = champion(client)
    add_new_style(env.catalog)
    real = MlflowClient.set_registered_model_alias

    def down(self: MlflowClient, name: str, alias: str, version: Any) -> None:
        if alias == "champion":
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("database is locked"))
        real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", down)
    with pytest.raises(RegistryUnavailableError):
        job.run("ci", env.overrides(**{"improve.finetune": False}))
    monkeypatch.undo()
    assert champion(client) == before
    assert watermarks(env) == []
    [failed] = client.search_runs(
        [client.get_experiment_by_name("imgsearch").experiment_id],  # the project's experiment
        "tags.`imgsearch.stage` = 'improve'",
    )
    assert failed.info.status == "FAILED"
    assert failed.data.tags["imgsearch.improve.decision"] == "failed"


def test_sigkill_mid_job_changes_nothing_and_the_next_run_completes(env: Env) -> None:
    client = env.client()
    before = champion(client)
    add_new_style(env.catalog)
    marker = env.root / "paused"
    args = [
        sys.executable, "-m", "monitoring.improve", "--profile", "ci",
        *(f"--set={k}={v}" for k, v in env.overrides(**{"improve.finetune": False}).items()),
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "IMGSEARCH_IMPROVE_PAUSE_AT": "promote",  # after the challenger was registered
            "IMGSEARCH_IMPROVE_PAUSE_FILE": str(marker),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 400
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "timeout"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # a challenger is registered, but nothing served moved and the watermark did not advance
    assert client.get_model_version_by_alias("imgsearch-index", "challenger").version != before[0]
    assert champion(client) == before
    assert watermarks(env) == []

    rerun = client.get_run(improve(env, **{"improve.finetune": False})).data
    assert rerun.tags["imgsearch.improve.decision"] in ("improve", "wait")
    assert rerun.metrics["n_new"] == N_ITEMS  # the killed run's data is taken in now
    assert rerun.tags["imgsearch.improve.index_extended"] == "true"
    assert len(watermarks(env)) == 1
    idx, ext = champion(client)
    assert ext == before[1] and idx != before[0]  # same extractor, the index grew
    served = client.get_model_version("imgsearch-index", idx)
    assert (
        served.tags["test_split_hash"]
        == client.get_model_version("imgsearch-index", before[0]).tags["test_split_hash"]
    )
