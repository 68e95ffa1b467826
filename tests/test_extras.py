"""Attribute features written by extraction (issue 16): same numbers, used by the attribute step
without reading an image again, and a logged fallback when they do not match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imgsearch.embed.extract import ExtractConfig, extract
from imgsearch.embed.extras import ExtrasSpec, extras_mismatch, load_extras
from imgsearch.embed.style import manifest_features
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import fingerprint, save_extractor
from steps.common import log_df
from tests.test_attributes import STEP_OVERRIDES, tiny_extractor, two_vendor_catalog

CFG = ExtractConfig(batch_size=8, num_workers=0, threads=1)


def catalog(folder: Path, n_items: int = 40) -> pd.DataFrame:
    """Two vendors' drawings of ``n_items`` items (split by item), plus one unreadable file."""
    manifest, _ = two_vendor_catalog(folder, n_items)
    rows = manifest.to_dict("records")
    (folder / "broken.png").write_bytes(b"not an image")
    rows.insert(5, {**rows[0], "image_id": "broken", "path": str(folder / "broken.png")})
    return pd.DataFrame(rows)


def test_extras_from_extraction_equal_manifest_features(tmp_path: Path) -> None:
    ext = tiny_extractor()
    manifest = catalog(tmp_path / "pics", n_items=6)
    spec = ExtrasSpec(("pooled", "gram"), (3, 6))
    plain = extract(ext, manifest, CFG, progress=False)
    result = extract(ext, manifest, CFG, progress=False, extras=spec)
    assert result.writer is not None
    folder = result.writer.save_extras(  # type: ignore[attr-defined]
        tmp_path / "extras", spec, {"extractor_fingerprint": fingerprint(ext)}
    )
    saved = load_extras(folder, ["pooled", "gram"])
    reference = manifest_features(ext, manifest, ["pooled", "gram"], (3, 6), 8, progress=False)

    assert "broken" not in saved.ids and list(result.failures["image_id"]) == ["broken"]
    assert saved.ids == reference.ids == list(result.ids) == list(plain.ids)
    np.testing.assert_allclose(result.embeddings, plain.embeddings, atol=1e-5)
    for kind in ("pooled", "gram"):
        np.testing.assert_allclose(
            saved.features[kind], reference.features[kind], rtol=2e-3, atol=2e-3
        )
    assert saved.meta["gram_blocks"] == [3, 6] and saved.meta["dtype"] == "float16"
    assert extras_mismatch(saved.meta, ["gram"], [3, 6], fingerprint(ext)) == ""
    assert "gram_blocks" in extras_mismatch(saved.meta, ["gram"], [3], fingerprint(ext))
    assert "another extractor" in extras_mismatch(saved.meta, ["pooled"], [3, 6], "other")


def test_extras_setting_resolves_from_the_attribute_config() -> None:
    attrs: dict[str, Any] = {
        "in_main": True,
        "gram_blocks": [3, 6],
        "attributes": {"a": {"features": ["embedding", "pooled"]}, "b": {"features": ["gram"]}},
    }
    assert ExtrasSpec.resolve("auto", attrs)[0] == ExtrasSpec(("pooled", "gram"), (3, 6))
    assert ExtrasSpec.resolve("auto", {**attrs, "in_main": False})[0] is None
    assert ExtrasSpec.resolve("none", attrs)[0] is None
    assert ExtrasSpec.resolve(["pooled"], attrs)[0] == ExtrasSpec(("pooled",), ())
    with pytest.raises(ConfigError, match="only"):
        ExtrasSpec.resolve(["embedding", "colour"], attrs)


def test_attribute_step_reads_the_extract_runs_extras_and_falls_back_with_a_reason(
    mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steps import attributes as attr_step
    from steps import extract as extract_step

    manifest = catalog(tmp_path / "pics")
    extractor_dir = save_extractor(tiny_extractor(), tmp_path / "extractor")
    with mlflow.start_run(run_name="split") as pre:
        log_df(manifest, "manifest.parquet")
    overrides = {**STEP_OVERRIDES, "extract.num_workers": 0, "extract.batch_size": 16}
    extract_id = extract_step.run(
        pre.info.run_id, pre.info.run_id, extractor_uri=str(extractor_dir), overrides=overrides
    )
    assert mlflow.get_run(extract_id).data.tags["imgsearch.extract.extras"].startswith("yes: gram")
    attr_overrides = {**STEP_OVERRIDES, "attributes.register": False}

    # with matching extras, no image is decoded again
    def no_decode(*_a: object, **_k: object) -> None:
        raise AssertionError("an image was read")

    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", no_decode)
        patch.setattr(attr_step, "manifest_features", no_decode)
        used = attr_step.run(extract_id, pre.info.run_id, overrides=attr_overrides)
    run = mlflow.get_run(used).data
    assert run.tags["imgsearch.attributes.features"] == "extract run extras (gram)"
    assert run.metrics["vendor_acc_at_1"] >= 0.9 and run.metrics["n_feature_failures"] == 0

    # other gram blocks: computed from the images, the reason tagged; the same heads' quality
    other = attr_step.run(
        extract_id, pre.info.run_id, overrides={**attr_overrides, "attributes.gram_blocks": [4]}
    )
    tag = mlflow.get_run(other).data.tags["imgsearch.attributes.features"]
    assert tag.startswith("computed: extras gram_blocks [3] != [4]"), tag

    # an extract run without extras (an older run, the Spark engine, extras: none)
    bare_id = extract_step.run(
        pre.info.run_id,
        pre.info.run_id,
        extractor_uri=str(extractor_dir),
        overrides={**overrides, "extract.extras": "none"},
    )
    assert mlflow.get_run(bare_id).data.tags["imgsearch.extract.extras"].startswith("no: ")
    computed = attr_step.run(bare_id, pre.info.run_id, overrides=attr_overrides)
    data = mlflow.get_run(computed).data
    assert data.tags["imgsearch.attributes.features"].startswith(
        "computed: the extract run has no extras"
    )
    assert abs(data.metrics["vendor_acc_at_1"] - run.metrics["vendor_acc_at_1"]) <= 0.07


def test_extras_another_backbone_cannot_give_are_skipped_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gram_blocks written for MobileNetV2 on a 3-block backbone: no extras (the attribute step
    says what is wrong when it runs), never a failed extraction."""
    from tests import train_data

    train_data.register_tiny(monkeypatch)
    ext = train_data.tiny_extractor()
    fits = ExtrasSpec(("pooled", "gram"), (0, 1))
    assert fits.unfit_for(ext) == ""
    assert "gram_blocks [3, 6, 10]" in ExtrasSpec(("gram",), (3, 6, 10)).unfit_for(ext)
    assert ExtrasSpec(("pooled",), ()).unfit_for(ext) == ""


def test_extras_beyond_float16_are_not_stored(tmp_path: Path) -> None:
    from imgsearch.embed.extras import ExtrasWriter

    writer = ExtrasWriter(2, 4, None)
    writer.write(["a", "b"], np.ones((2, 4), np.float32))
    writer.write_extras(["a", "b"], {"gram": np.array([[1.0], [1e6]])}, np.array([True, True]))
    with pytest.raises(ValueError, match="beyond float16"):
        writer.save_extras(tmp_path / "x", ExtrasSpec(("gram",), (0,)), {})
