"""The out-of-domain probe catalog: a folder of icons, category = folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
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
