"""Shared fixtures: a private MLflow store, a small synthetic folder catalog, a tiny extractor.

Every test gets MLflow's tracking and registry URIs back as they were, and no run left active:
a test that points MLflow at its own store cannot leak it into the next test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image, ImageDraw

# mlflow.set_experiment() writes the id into os.environ as well as into a module global: a test
# that calls it would send every later test's runs to an experiment their own stores do not have
_EXPERIMENT_ENV = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@pytest.fixture(autouse=True)
def _mlflow_isolated() -> Iterator[None]:
    """Restore MLflow's tracking/registry URIs and active experiment (module global and
    environment) and end stray active runs after every test."""
    from mlflow.tracking import fluent

    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    experiment = fluent._active_experiment_id
    env = {key: os.environ.get(key) for key in _EXPERIMENT_ENV}
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run("FAILED")
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(registry)
    fluent._active_experiment_id = experiment
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private SQLite tracking + registry store in ``tmp_path`` (also the working directory, so
    ``./mlruns`` artifacts land there too, and ``$IMGSEARCH_HOME`` is private). Returns its URI."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def make_folder_catalog(root: Path, n_items: int = 15, per_item: int = 3) -> Path:
    """One folder per item; an item's images are the same polygon in different colours/offsets.

    Also one broken file (``item00/broken.png``), which validation must quarantine.
    """
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


@pytest.fixture(scope="session")
def folder_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only 15-item x 3-image folder catalog (plus one broken file), made once."""
    return make_folder_catalog(tmp_path_factory.mktemp("folder_catalog"))
