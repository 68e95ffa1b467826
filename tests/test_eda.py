"""imgsearch.data.eda: the report exists, is self-contained, has every section, and its figures are right."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imgsearch import schema
from imgsearch.config import from_dict, load_config
from imgsearch.data.eda import NOT_IN_CATALOG, EdaConfig, build_report

SECTIONS = (
    "summary",
    "categories",
    "subcategories",
    "images_per_item",
    "downloads",
    "likes",
    "nsfw",
    "formats",
    "sizes",
    "attributes",
    "tags",
    "created_at",
    "quarantine",
    "samples",
)


def _catalog(tmp_path: Path, *, extras: bool, absent: str = "empty") -> pd.DataFrame:
    """5 items, 9 images. ``extras`` adds downloads/likes/nsfw/tags/created_at; without them the
    columns are empty (``absent="empty"``, as ingest leaves them) or missing (``absent="missing"``)."""
    rng = np.random.default_rng(0)
    images_per_item = [1, 2, 3, 2, 1]
    categories = ["Animals", "Animals", "Food <b>&</b> Drink", "Flags", "Flags"]
    rows = []
    for i, (n, category) in enumerate(zip(images_per_item, categories, strict=True)):
        for j in range(n):
            path = tmp_path / f"i{i}_{j}.png"
            size = (64, 64) if j == 0 else (48, 32)
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
            row = {
                "image_id": f"i{i}_{j}",
                "item_id": f"i{i}",
                "uri": path.name,
                "path": str(path),
                "item_name": f"item $x_{i}$",
                "category": category,
                "subcategory": f"sub{i % 3}",
                "vendor": ["google", "apple", "twitter"][j],
                "format": "PNG" if (i + j) % 3 else "JPEG",
                "width": size[0],
                "height": size[1],
                "fixes": "alpha_composited" if j else "",
            }
            if extras:
                row.update(
                    downloads=[0, 10, 1000, 50, 5][i],
                    likes=[1, 2, 30, 4, 500][i],
                    nsfw=[False, False, True, False, False][i],
                    tags="red, round" if i % 2 else "blue",
                    created_at=f"2024-0{i + 1}-15",
                )
            elif absent == "empty":
                row.update(downloads=None, likes=None, nsfw=None, tags=None, created_at=None)
            rows.append(row)
    return pd.DataFrame(rows)


def _quarantine() -> pd.DataFrame:
    return schema.quarantine_rows(
        [
            {"image_id": "q1", "stage": "validate", "reason": "truncated", "detail": "cut"},
            {"image_id": "q2", "stage": "validate", "reason": "truncated", "detail": "cut"},
            {"image_id": "q3", "stage": "ingest", "reason": "unsafe_path", "detail": "../x"},
        ]
    )


def _sections(text: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', text, flags=re.S))


Built = tuple[Path, str, dict[str, float]]  # out_dir, html, metrics


def _build(tmp: Path, manifest: pd.DataFrame) -> Built:
    report, metrics = build_report(manifest, _quarantine(), tmp / "out")
    assert report == tmp / "out" / "report.html"
    return tmp / "out", report.read_text(), metrics


# Reports take a second or two each: build each variant once per module.
@pytest.fixture(scope="module", params=["empty", "missing"])
def without_extras(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Built:
    tmp = tmp_path_factory.mktemp(f"eda_{request.param}")
    return _build(tmp, _catalog(tmp, extras=False, absent=request.param))


@pytest.fixture(scope="module")
def with_extras(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("eda_full")
    manifest = _catalog(tmp, extras=True)
    manifest.loc[0, "category"] = "<script>alert(1)</script>"
    return _build(tmp, manifest)


def test_report_without_optional_attributes(without_extras: Built) -> None:
    out, text, metrics = without_extras
    sections = _sections(text)
    assert tuple(sections) == SECTIONS
    for key in ("downloads", "likes", "nsfw", "tags", "created_at"):
        assert NOT_IN_CATALOG in sections[key], key
        assert not (out / f"{key}.png").exists()
    assert "nsfw_share" not in metrics and "downloads_median" not in metrics
    for key in ("categories", "subcategories", "images_per_item", "formats", "sizes", "quarantine"):
        assert (out / f"{key}.png").exists(), key
        assert "data:image/png;base64," in sections[key], key


def test_report_with_every_attribute(with_extras: Built) -> None:
    out, text, metrics = with_extras
    sections = _sections(text)
    assert tuple(sections) == SECTIONS
    for key in ("downloads", "likes", "nsfw", "tags", "created_at"):
        assert NOT_IN_CATALOG not in sections[key], key
        assert (out / f"{key}.png").exists(), key
    assert (out / "attribute_vendor.png").exists()
    assert metrics["nsfw_share"] == pytest.approx(1 / 5)
    assert metrics["downloads_median"] == 10 and metrics["likes_median"] == 4
    assert "1 items at 0 are not on the log axis" in sections["downloads"]
    assert "items at 0" not in sections["likes"]
    assert sections["samples"].count("<figure>") == 9


def test_metrics_match_a_hand_count(without_extras: Built) -> None:
    _, _, metrics = without_extras
    assert metrics["n_images"] == 9 and metrics["n_items"] == 5
    assert metrics["n_categories"] == 3 and metrics["n_subcategories"] == 3
    assert metrics["images_per_item_mean"] == pytest.approx(9 / 5)
    assert metrics["images_per_item_median"] == 2
    assert (metrics["images_per_item_min"], metrics["images_per_item_max"]) == (1, 3)
    assert metrics["n_quarantined"] == 3 and metrics["quarantine_rate"] == pytest.approx(3 / 12)
    jpeg = sum((i + j) % 3 == 0 for i, n in enumerate([1, 2, 3, 2, 1]) for j in range(n))
    assert metrics["format_share_jpeg"] == pytest.approx(jpeg / 9)
    assert metrics["format_share_png"] == pytest.approx(1 - jpeg / 9)


def test_report_is_self_contained_and_escapes_catalog_text(with_extras: Built) -> None:
    _, text, _ = with_extras
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, flags=re.I)
    assert "<link" not in text and "@import" not in text
    assert "<script" not in text.lower()
    assert "&lt;script&gt;" in text
    assert "Food &lt;b&gt;&amp;&lt;/b&gt; Drink" in text


def test_empty_quarantine_and_a_minimal_manifest(tmp_path: Path) -> None:
    manifest = pd.DataFrame({"image_id": ["a", "b"], "item_id": ["x", "x"], "uri": ["a", "b"]})
    report, metrics = build_report(
        manifest, schema.empty_quarantine(), tmp_path / "out", EdaConfig(thumbnails=0)
    )
    sections = _sections(report.read_text())
    assert "No file was quarantined." in sections["quarantine"]
    assert NOT_IN_CATALOG in sections["categories"]
    assert (
        metrics["quarantine_rate"] == 0 and metrics["n_items"] == 1 and metrics["n_categories"] == 0
    )


def test_missing_item_id_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="item_id"):
        build_report(pd.DataFrame({"image_id": ["a"]}), schema.empty_quarantine(), tmp_path)


def test_yaml_defaults_build_the_default_config() -> None:
    assert from_dict(EdaConfig, load_config()["eda"]) == EdaConfig()
