"""imgsearch.data.validate and steps.validate: bad-input folder, dedupe, caps, accounting, the step."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from imgsearch import schema
from imgsearch.config import from_dict, load_config
from imgsearch.data import near_duplicates
from imgsearch.data import validate as validate_mod
from imgsearch.data.imageio import load_image
from imgsearch.data.validate import ValidateConfig, ValidateResult, validate
from imgsearch.errors import CatalogError, ConfigError
from tests import badimages as bad


def manifest_of(paths: list[Path], items: list[str] | None = None) -> pd.DataFrame:
    items = items or ["item"] * len(paths)
    return pd.DataFrame(
        {
            schema.IMAGE_ID: [p.name for p in paths],
            schema.ITEM_ID: items,
            schema.URI: [p.name for p in paths],
            schema.PATH: [str(p) for p in paths],
            "vendor": ["v"] * len(paths),
        }
    )


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def accounted(result: ValidateResult, n: int) -> None:
    assert len(result.clean) + len(result.quarantine) == n
    ids = list(result.clean[schema.IMAGE_ID]) + list(result.quarantine[schema.IMAGE_ID])
    assert len(set(ids)) == n
    assert result.metrics["n_input"] == n
    assert result.metrics["n_clean"] == len(result.clean)
    assert result.metrics["n_quarantined"] == len(result.quarantine)
    reasons = {k: v for k, v in result.metrics.items() if k.startswith("quarantine.")}
    assert sum(reasons.values()) == len(result.quarantine)
    assert set(result.quarantine[schema.STAGE]) <= {"validate"}


# --- the whole bad-input folder ------------------------------------------------------------------


def test_bad_input_folder_every_file_is_clean_or_quarantined(tmp_path: Path) -> None:
    folder, store = tmp_path / "in", tmp_path / "clean"
    expected = bad.write_bad_inputs(folder)
    paths = [folder / name for name in sorted(expected)]
    # one item for all: also shows the fixtures are not near duplicates of each other
    result = validate(manifest_of(paths), ValidateConfig(), store)
    accounted(result, len(paths))

    reasons = dict(
        zip(result.quarantine[schema.IMAGE_ID], result.quarantine[schema.REASON], strict=True)
    )
    got = {name: reasons.get(name) for name in expected}
    assert got == expected
    detected = dict(
        zip(
            result.quarantine[schema.IMAGE_ID],
            result.quarantine[schema.DETECTED_FORMAT],
            strict=True,
        )
    )
    for name, kind in bad.EXPECTED_DETECTED.items():
        assert detected[name] == kind, name
    assert result.quarantine[schema.DETAIL].str.len().gt(0).all()

    clean = result.clean.set_index(schema.IMAGE_ID)
    for name, fixes in bad.EXPECTED_FIXES.items():
        assert fixes <= set(clean.loc[name, schema.FIXES].split(";")), name
    for name, row in clean.iterrows():
        original = (folder / str(name)).read_bytes()
        assert row[schema.SHA256] == hashlib.sha256(original).hexdigest()
        loaded = load_image(original, filename=str(name))
        assert row[schema.FORMAT] == loaded.format
        assert (row[schema.WIDTH], row[schema.HEIGHT]) == loaded.image.size
        assert len(row[schema.PHASH]) == 64  # 256-bit perceptual hash, hex
        if row[schema.FIXES]:
            # the normalised copy, content-addressed by the original's sha256
            sha = row[schema.SHA256]
            assert Path(row[schema.PATH]) == store.resolve() / sha[:2] / f"{sha}.png"
            copy = Image.open(row[schema.PATH])
            assert copy.format == "PNG" and copy.mode == "RGB"
            assert np.array_equal(np.asarray(copy), np.asarray(loaded.image))
        else:
            assert row[schema.PATH] == str(folder / str(name))
    assert result.metrics["n_fixed"] == (clean[schema.FIXES] != "").sum()
    assert result.metrics["fixes.exif_orientation"] == 7
    assert result.metrics["fixes.ext_mismatch"] == 1
    assert not list(store.rglob("*.tmp"))  # atomic writes leave no temporary files
    # the extra columns of the manifest are carried through
    assert (result.clean["vendor"] == "v").all()


def test_jpeg_named_png_gets_a_fixed_png_copy(tmp_path: Path) -> None:
    path = write(tmp_path, "photo.png", bad.encode(bad.noise(1), "JPEG", quality=90))
    result = validate(manifest_of([path]), ValidateConfig(), tmp_path / "clean")
    row = result.clean.iloc[0]
    assert row[schema.FIXES] == "ext_mismatch:jpeg_as_png"
    assert row[schema.FORMAT] == "JPEG"
    fixed = Path(row[schema.PATH])
    assert fixed != path and fixed.read_bytes().startswith(b"\x89PNG")


def test_unreadable_paths_are_quarantined(tmp_path: Path) -> None:
    ok = write(tmp_path, "ok.png", bad.encode(bad.noise(2), "PNG"))
    (tmp_path / "adir.png").mkdir()
    m = manifest_of([ok, tmp_path / "missing.png", tmp_path / "adir.png", tmp_path / "none.png"])
    m.loc[3, schema.PATH] = None
    result = validate(m, ValidateConfig(), tmp_path / "clean")
    accounted(result, 4)
    assert list(result.clean[schema.IMAGE_ID]) == ["ok.png"]
    assert set(result.quarantine[schema.REASON]) == {"unreadable"}


def test_file_too_large(tmp_path: Path) -> None:
    path = write(tmp_path, "a.png", bad.encode(bad.noise(3), "PNG"))
    result = validate(manifest_of([path]), ValidateConfig(max_bytes=100), tmp_path / "clean")
    assert result.quarantine[schema.REASON].tolist() == ["file_too_large"]


def test_one_unexpected_failure_does_not_stop_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [write(tmp_path, f"{i}.png", bad.encode(bad.noise(10 + i), "PNG")) for i in range(3)]
    real = validate_mod.load_image

    def flaky(data: bytes, **kw: object) -> object:
        if kw.get("filename") == "1.png":
            raise RuntimeError("bug nobody foresaw")
        return real(data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(validate_mod, "load_image", flaky)
    result = validate(manifest_of(paths), ValidateConfig(), tmp_path / "clean")
    accounted(result, 3)
    assert result.quarantine[schema.REASON].tolist() == ["unexpected_error"]
    assert "RuntimeError" in result.quarantine[schema.DETAIL].iloc[0]


def test_non_utf8_file_name_gives_parquet_safe_rows(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.jpg")  # not UTF-8: arrives as a lone surrogate
    path = tmp_path / name
    path.write_bytes(bad.FOREIGN_HEADERS["document_pdf.jpg"])
    m = manifest_of([path])
    m[schema.IMAGE_ID] = ["img-1"]
    m[schema.URI] = [name]
    result = validate(m, ValidateConfig(), tmp_path / "clean")
    assert result.quarantine[schema.REASON].tolist() == ["not_an_image"]
    result.quarantine.to_parquet(tmp_path / "q.parquet")  # raises on a lone surrogate


# --- duplicates and caps -------------------------------------------------------------------------


def test_exact_duplicates_keep_the_first(tmp_path: Path) -> None:
    data = bad.encode(bad.noise(20), "PNG")
    a, b = write(tmp_path, "a.png", data), write(tmp_path, "b.png", data)
    c = write(tmp_path, "c.png", bad.encode(bad.noise(21), "PNG"))
    result = validate(manifest_of([a, b, c], ["x", "y", "x"]), ValidateConfig(), tmp_path / "clean")
    accounted(result, 3)
    assert list(result.clean[schema.IMAGE_ID]) == ["a.png", "c.png"]
    row = result.quarantine.iloc[0]
    assert (row[schema.IMAGE_ID], row[schema.REASON]) == ("b.png", "duplicate_exact")
    assert "a.png" in row[schema.DETAIL]


def _near_copies(tmp_path: Path) -> list[Path]:
    """An image, a JPEG re-encode of it and a slightly brighter copy: near duplicates."""
    image = bad.noise(30, size=(64, 64)).resize((64, 64))
    smooth = image.resize((16, 16)).resize((64, 64), Image.BILINEAR)  # JPEG-friendly content
    brighter = ImageEnhance.Brightness(smooth).enhance(1.05)
    other = bad.noise(31, size=(16, 16)).resize((64, 64), Image.BILINEAR)
    return [
        write(tmp_path, "orig.png", bad.encode(smooth, "PNG")),
        write(tmp_path, "reenc.jpg", bad.encode(smooth, "JPEG", quality=70)),
        write(tmp_path, "bright.png", bad.encode(brighter, "PNG")),
        write(tmp_path, "other.png", bad.encode(other, "PNG")),
    ]


def test_near_duplicates_within_an_item_are_dropped(tmp_path: Path) -> None:
    paths = _near_copies(tmp_path)
    result = validate(manifest_of(paths), ValidateConfig(), tmp_path / "clean")
    accounted(result, 4)
    assert list(result.clean[schema.IMAGE_ID]) == ["orig.png", "other.png"]
    q = result.quarantine.set_index(schema.IMAGE_ID)
    assert set(q.index) == {"reenc.jpg", "bright.png"}
    assert (q[schema.REASON] == "duplicate_near").all()
    assert q[schema.DETAIL].str.contains("orig.png").all()
    pairs = result.near_duplicates
    actions = {(a, b): act for a, b, act in pairs[["image_id_a", "image_id_b", "action"]].values}
    # each drop names the kept image it duplicates; pairs between two dropped ones are reported
    assert actions == {
        ("orig.png", "reenc.jpg"): "dropped",
        ("orig.png", "bright.png"): "dropped",
        ("reenc.jpg", "bright.png"): "reported",
    }
    assert pairs["same_item"].all()


def test_cross_item_near_duplicates_are_reported_not_dropped_by_default(tmp_path: Path) -> None:
    paths = _near_copies(tmp_path)[:2]
    m = manifest_of(paths, ["x", "y"])
    result = validate(m, ValidateConfig(), tmp_path / "clean")
    assert len(result.clean) == 2 and result.quarantine.empty
    assert result.metrics["near_duplicate_pairs_cross_item"] == 1
    pair = result.near_duplicates.iloc[0]
    assert (pair["image_id_a"], pair["image_id_b"], pair["action"]) == (
        "orig.png",
        "reenc.jpg",
        "reported",
    )

    dropped = validate(m, ValidateConfig(near_duplicate_scope="all"), tmp_path / "clean")
    assert dropped.quarantine[schema.REASON].tolist() == ["duplicate_near"]
    kept = validate(manifest_of(paths), ValidateConfig(near_duplicate_scope="none"), tmp_path / "c")
    assert len(kept.clean) == 2 and len(kept.near_duplicates) == 1


def test_a_dropped_image_does_not_drop_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ~ B and B ~ C but A !~ C: B goes (near A), C stays (its only near partner is gone).
    fake_hash = {10: 0b0, 20: 0b111, 30: 0b111111}

    class FakeImagehash:
        @staticmethod
        def phash(image: Image.Image, hash_size: int = 8) -> str:
            return format(fake_hash[image.getpixel((0, 0))[0]], "016x")

    monkeypatch.setattr(validate_mod, "imagehash", FakeImagehash)
    paths = [
        write(tmp_path, f"{v}.png", bad.encode(Image.new("RGB", (32, 32), (v, 0, 0)), "PNG"))
        for v in fake_hash
    ]
    cfg = ValidateConfig(phash_size=8, near_duplicate_distance=4)
    result = validate(manifest_of(paths), cfg, tmp_path / "clean")
    assert list(result.clean[schema.IMAGE_ID]) == ["10.png", "30.png"]
    assert result.quarantine[schema.IMAGE_ID].tolist() == ["20.png"]


def test_distinct_images_are_not_near_duplicates(tmp_path: Path) -> None:
    paths = [write(tmp_path, f"{i}.png", bad.encode(bad.noise(40 + i), "PNG")) for i in range(12)]
    result = validate(manifest_of(paths), ValidateConfig(), tmp_path / "clean")
    assert len(result.clean) == 12 and result.near_duplicates.empty


def test_near_pairs_match_a_naive_reference() -> None:
    rng = np.random.default_rng(0)
    base = [format(int(v), "016x") for v in rng.integers(0, 2**63, 40)]
    hashes = []
    for i in range(300):  # many near copies: flip a few bits of a base hash
        value = int(base[i % 40], 16) ^ sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 8)))
        hashes.append(format(value, "016x"))
    items = [str(i % 3) for i in range(300)]
    for all_pairs in (True, False):
        got = near_duplicates.near_pairs(hashes, items, 6, all_pairs=all_pairs)
        ref = []
        for b in range(300):
            for a in range(b):
                d = bin(int(hashes[a], 16) ^ int(hashes[b], 16)).count("1")
                if d <= 6 and (all_pairs or items[a] == items[b]):
                    ref.append((a, b, d))
        assert got == ref
        assert len(ref) > (100 if all_pairs else 30)


def test_cap_per_item_keeps_the_first_in_manifest_order(tmp_path: Path) -> None:
    paths = [write(tmp_path, f"{i}.png", bad.encode(bad.noise(50 + i), "PNG")) for i in range(6)]
    items = ["a", "a", "b", "a", "a", "b"]
    result = validate(
        manifest_of(paths, items), ValidateConfig(max_images_per_item=2), tmp_path / "c"
    )
    accounted(result, 6)
    assert list(result.clean[schema.IMAGE_ID]) == ["0.png", "1.png", "2.png", "5.png"]
    assert result.quarantine[schema.REASON].tolist() == ["over_item_cap", "over_item_cap"]
    assert result.metrics["quarantine.over_item_cap"] == 2


def test_too_small_uses_the_config(tmp_path: Path) -> None:
    path = write(tmp_path, "s.png", bad.encode(bad.noise(60, size=(40, 40)), "PNG"))
    assert validate(manifest_of([path]), ValidateConfig(min_size=64), tmp_path / "c").quarantine[
        schema.REASON
    ].tolist() == ["too_small"]
    assert (
        len(validate(manifest_of([path]), ValidateConfig(min_size=32), tmp_path / "c").clean) == 1
    )


# --- inputs and config ---------------------------------------------------------------------------


def test_bad_manifests_raise(tmp_path: Path) -> None:
    path = write(tmp_path, "a.png", bad.encode(bad.noise(70), "PNG"))
    m = manifest_of([path, path])
    with pytest.raises(CatalogError, match="duplicate image_id"):
        validate(m, ValidateConfig(), tmp_path / "c")
    with pytest.raises(CatalogError, match="path"):
        validate(m.drop(columns=[schema.PATH]), ValidateConfig(), tmp_path / "c")


def test_config_file_matches_the_dataclass() -> None:
    cfg = from_dict(ValidateConfig, load_config()["validate"])
    assert cfg == ValidateConfig()
    for bad_values in (
        {"near_duplicate_scope": "everything"},
        {"near_duplicate_distance": 300},
        {"max_images_per_item": 0},
        {"min_size": 0},
        {"workers": 0},
    ):
        with pytest.raises(ConfigError):
            ValidateConfig(**bad_values)  # type: ignore[arg-type]


def test_empty_manifest(tmp_path: Path) -> None:
    result = validate(manifest_of([]), ValidateConfig(), tmp_path / "c")
    accounted(result, 0)


def test_process_pool_gives_the_same_result(tmp_path: Path) -> None:
    expected = bad.write_bad_inputs(tmp_path / "in")
    paths = [tmp_path / "in" / name for name in sorted(expected)]
    one = validate(manifest_of(paths), ValidateConfig(workers=1), tmp_path / "c1")
    two = validate(manifest_of(paths), ValidateConfig(workers=2), tmp_path / "c2")
    cols = [schema.IMAGE_ID, schema.SHA256, schema.FIXES, schema.PHASH, schema.WIDTH]
    pd.testing.assert_frame_equal(one.clean[cols], two.clean[cols])
    pd.testing.assert_frame_equal(one.quarantine, two.quarantine)


# --- the step ------------------------------------------------------------------------------------


@pytest.mark.slow  # an MLflow sqlite store: ~10-25 s on a shared 2-core machine
def test_step_logs_clean_manifest_and_combined_quarantine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from steps import common
    from steps import validate as step

    previous_uri = tracking_utils._tracking_uri
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # the default artifact root (./mlruns) lands in tmp_path
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        expected = bad.write_bad_inputs(tmp_path / "in")
        paths = [tmp_path / "in" / name for name in sorted(expected)]
        ingest_rejected = schema.quarantine_rows(
            [
                {
                    schema.IMAGE_ID: "gone",
                    schema.ITEM_ID: "x",
                    schema.URI: "../etc/passwd",
                    schema.STAGE: "ingest",
                    schema.REASON: "unsafe_path",
                }
            ]
        )
        with mlflow.start_run(run_name="ingest") as ingest:
            common.log_df(manifest_of(paths), "manifest.parquet")
            common.log_df(ingest_rejected, "rejected.parquet")
        run_id = step.run(ingest.info.run_id, {"validate.min_size": 32})

        clean = common.read_df(run_id, "manifest.parquet")
        quarantine = common.read_df(run_id, "quarantine.parquet")
        assert len(clean) == sum(r is None for r in expected.values())
        assert len(quarantine) == 1 + sum(r is not None for r in expected.values())
        assert quarantine[schema.STAGE].tolist().count("ingest") == 1
        fixed = clean[clean[schema.FIXES] != ""]
        assert fixed[schema.PATH].str.startswith(str((tmp_path / "home" / "clean").resolve())).all()
        metrics = mlflow.get_run(run_id).data.metrics
        assert metrics["n_input"] == len(paths)
        assert metrics["quarantine.decompression_bomb"] == 1

        # an ingest run without rejected.parquet is fine too
        with mlflow.start_run(run_name="ingest2") as ingest2:
            common.log_df(manifest_of(paths[:3]), "manifest.parquet")
        run2 = step.run(ingest2.info.run_id)
        assert len(common.read_df(run2, "quarantine.parquet")) == sum(
            expected[p.name] is not None for p in paths[:3]
        )
    finally:
        mlflow.set_tracking_uri(previous_uri)


def test_fifo_and_non_utf8_paths_from_a_manifest(tmp_path: Path) -> None:
    """A FIFO named by a catalog is refused without blocking; a non-UTF-8 name stored as a
    ``file:`` URI (imgsearch.paths.path_to_str) is read, not quarantined as unreadable."""
    import os

    from PIL import Image as PILImage

    from imgsearch.paths import path_to_str

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    raw_name = os.fsencode(tmp_path) + b"/caf\xe9.png"
    rng = np.random.default_rng(7)
    PILImage.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
        os.fsdecode(raw_name)
    )
    manifest = pd.DataFrame(
        {
            "image_id": ["fifo", "latin1"],
            "item_id": ["a", "b"],
            "uri": ["pipe.png", "cafe.png"],
            "path": [str(fifo), path_to_str(raw_name)],
        }
    )
    result = validate(manifest, ValidateConfig(), tmp_path / "clean")
    assert list(result.clean["image_id"]) == ["latin1"]
    assert result.quarantine.set_index("image_id").loc["fifo", "reason"] == "not_a_file"
