"""End to end: ``steps.main`` on a small synthetic folder catalog, in a private MLflow store.

Every stage leaves a nested run under the parent, the two models are registered with aliases,
and the headline test metrics reach the parent run.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image, ImageDraw

RETRIEVAL = ("extract", "index", "evaluate", "register", "promote")
STAGES = ("ingest", "validate", "preprocess", "eda", "split", *RETRIEVAL)
#: run-id tags on the parent: the baseline stages, then the fine-tuned model's
PARENT_TAGS = (*STAGES, "finetune", *(f"finetuned.{s}" for s in RETRIEVAL))


def _catalog(root: Path, n_items: int = 15, per_item: int = 3) -> Path:
    """One folder per item; an item's images are the same shape in different colours/offsets."""
    rng = np.random.default_rng(0)
    for i in range(n_items):
        folder = root / f"item{i:02d}"
        folder.mkdir(parents=True)
        sides = 3 + i % 5
        for j in range(per_item):
            img = Image.new("RGB", (64, 64), tuple(int(c) for c in rng.integers(0, 255, 3)))
            draw = ImageDraw.Draw(img)
            cx, cy, r = 32 + j * 2, 32 - j, 12 + i % 4 * 4
            angle = np.pi * i / 7
            pts = [
                (
                    cx + r * np.cos(angle + 2 * np.pi * k / sides),
                    cy + r * np.sin(angle + 2 * np.pi * k / sides),
                )
                for k in range(sides)
            ]
            draw.polygon(pts, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            img.save(folder / f"{j}.png")
    (root / "item00" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


@pytest.fixture()
def private_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_main_runs_every_stage_nested_and_registers(tmp_path: Path, private_mlflow: str) -> None:
    from steps import main

    data = _catalog(tmp_path / "catalog")
    overrides = {
        "ingest.source": "folder",
        "ingest.path": str(data),
        "extract.backbone": "mobilenet_v2",
        "extract.weights": "none",
        "preprocess.size": 64,
        "eda.thumbnails": 0,
        "evaluate.plots": False,
    }
    parent_id = main.run(profile="ci", overrides=overrides)

    client = MlflowClient()
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert sorted(r.data.tags["imgsearch.stage"] for r in children) == sorted(
        (*STAGES, "finetune", *RETRIEVAL)
    )
    assert all(r.info.status == "FINISHED" for r in children)
    for stage in PARENT_TAGS:
        assert parent.data.tags[f"imgsearch.run.{stage}"]

    # nothing silently dropped: the broken file is in quarantine, the rest is clean
    validate_run = client.get_run(parent.data.tags["imgsearch.run.validate"])
    assert validate_run.data.metrics["n_clean"] == 45
    assert (
        validate_run.data.metrics["quarantine.corrupt"]
        + validate_run.data.metrics.get("quarantine.truncated", 0)
        == 1
    )

    assert "test.map_at_r" in parent.data.metrics
    assert 0.0 <= parent.data.metrics["test.map_at_r"] <= 1.0

    assert "finetuned.test.map_at_r" in parent.data.metrics
    baseline, tuned = (
        parent.data.metrics["test.map_at_r"],
        parent.data.metrics["finetuned.test.map_at_r"],
    )

    table = pd.read_parquet(
        mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="before_after.parquet")
    ).set_index("metric")
    assert table.loc["map_at_r", "baseline"] == pytest.approx(baseline)
    assert table.loc["map_at_r", "finetuned"] == pytest.approx(tuned)
    assert {"fq_nmi", "fq_ratio", "hit_at_1"} <= set(table.index)

    # the fine-tuned pair is version 2 and the challenger; it is champion only if it won the gate
    for name in ("imgsearch-extractor", "imgsearch-index"):
        challenger = client.get_model_version_by_alias(name, "challenger")
        assert str(challenger.version) == "2"
    champion = client.get_model_version_by_alias("imgsearch-index", "champion")
    assert str(champion.version) == ("2" if tuned >= baseline else "1")
