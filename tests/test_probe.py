"""The out-of-domain probe catalog: a folder of icons, category = folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from imgsearch.data.probe import ProbeConfig, probe_catalog
from imgsearch.errors import ConfigError


def _icon(path: Path, seed: int, shape: str) -> None:
    """A 32x32 RGBA glyph on transparency, like a symbolic icon."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    a, b = (int(v) for v in rng.integers(2, 12, size=2))
    box = (a, b, a + 16, b + 16)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=(40, 40, 40, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture
def theme(tmp_path: Path) -> Path:
    root = tmp_path / "96x96"
    for i in range(4):
        _icon(root / "places" / f"p{i}.png", i, "square")
        _icon(root / "emotes" / f"e{i}.png", 100 + i, "circle")
    _icon(root / "apps" / "only.png", 7, "circle")  # one icon: too small a category
    (root / "places" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (root / "emotes" / "copy.png").write_bytes((root / "places" / "p0.png").read_bytes())
    (root / "emotes" / ".hidden.png").write_bytes(b"")
    (root / "stray.png").write_bytes((root / "places" / "p1.png").read_bytes())
    return root


def test_probe_lists_categories_and_quarantines_the_rest(theme: Path) -> None:
    probe = probe_catalog(theme, ProbeConfig(min_per_category=3))
    m = probe.manifest
    assert list(m["image_id"]) == sorted(m["image_id"])
    assert sorted(m["category"].unique()) == ["emotes", "places"]
    assert (m["item_id"] == m["category"]).all()
    assert len(m) == 8
    assert all(os.path.isabs(p) and Path(p).is_file() for p in m["path"])
    reasons = dict(zip(probe.quarantine["image_id"], probe.quarantine["reason"], strict=True))
    assert reasons["places/broken.png"] in {"corrupt", "truncated"}
    # the first by image_id is kept: emotes/copy.png sorts before places/p0.png
    assert reasons["places/p0.png"] == "duplicate"
    assert "emotes/copy.png" in set(m["image_id"])
    assert reasons["apps/only.png"] == "small_category"
    assert reasons["emotes/.hidden.png"] == "hidden"
    assert reasons["stray.png"] == "no_item"
    assert set(probe.quarantine["stage"]) == {"probe"}
    assert probe.metrics["probe_n_categories"] == 2


def test_probe_is_deterministic_and_filters(theme: Path) -> None:
    cfg = ProbeConfig(min_per_category=3, exclude=("apps",), max_per_category=3)
    a = probe_catalog(theme, cfg).manifest
    b = probe_catalog(theme, cfg).manifest
    assert a.equals(b)
    assert a["category"].value_counts().to_dict() == {"emotes": 3, "places": 3}
    assert "apps/only.png" not in set(probe_catalog(theme, cfg).quarantine["image_id"])


def test_probe_needs_two_categories(theme: Path) -> None:
    with pytest.raises(ConfigError, match="two at least"):
        probe_catalog(theme, ProbeConfig(min_per_category=3, include=("places",)))


def test_probe_scores_rank_the_probe_by_category(theme: Path) -> None:
    from imgsearch.embed.extract import ExtractConfig
    from imgsearch.evaluate.probe import probe_scores
    from imgsearch.models.backbones import create_extractor

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    probe = probe_catalog(theme, ProbeConfig(min_per_category=3))
    extractor = create_extractor("mobilenet_v2", weights="none")
    metrics, quarantine = probe_scores(
        extractor, probe, ks=(1, 5), extract_cfg=ExtractConfig(num_workers=0, threads=1)
    )
    assert metrics["probe_n_queries"] == len(probe.manifest) == 8
    for name in ("probe_map_at_r", "probe_precision_at_5", "probe_hit_at_1"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["probe_n_categories"] == 2 and metrics["probe_n_unreadable"] == 0
    assert len(quarantine) == len(probe.quarantine)


def test_evaluate_step_logs_probe_figures_beside_the_test_figures(
    theme: Path, mlflow_store: str, tmp_path: Path
) -> None:
    import mlflow

    from imgsearch.embed.files import save_embeddings
    from imgsearch.models.backbones import create_extractor, save_extractor
    from steps import evaluate as evaluate_step

    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(12)]
    manifest = pd.DataFrame(
        {"image_id": ids, "item_id": [f"it{i // 3}" for i in range(12)], "split": "test"}
    )
    with mlflow.start_run(run_name="split") as split_run:
        manifest.to_parquet(tmp_path / "manifest.parquet")
        mlflow.log_artifact(str(tmp_path / "manifest.parquet"))
    with mlflow.start_run(run_name="extract") as extract_run:
        emb = rng.normal(size=(12, 8)).astype(np.float32)
        save_embeddings(tmp_path / "embeddings.parquet", ids, emb)
        mlflow.log_artifact(str(tmp_path / "embeddings.parquet"))
        ext_dir = save_extractor(create_extractor("mobilenet_v2", "none"), tmp_path / "extractor")
        mlflow.log_artifacts(str(ext_dir), "extractor")
    overrides = {
        "evaluate.probe_dir": str(theme),
        "evaluate.probe_min_per_category": 3,
        "evaluate.plots": False,
        "evaluate.report": False,
        "evaluate.feature_quality": False,
    }
    run_id = evaluate_step.run(extract_run.info.run_id, split_run.info.run_id, overrides)
    metrics = mlflow.get_run(run_id).data.metrics
    assert "map_at_r" in metrics and 0.0 <= metrics["probe_map_at_r"] <= 1.0
    assert "probe_precision_at_10" in metrics and metrics["probe_n_categories"] == 2
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert "probe_quarantine.parquet" in names
