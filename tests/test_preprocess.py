"""imgsearch.data.preprocess: determinism, resize policies, normalisation, the cache, failures, config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from imgsearch import schema
from imgsearch.config import from_dict, load_config
from imgsearch.data import imageio
from imgsearch.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    cache_path,
    load_uint8,
    preprocess,
    to_tensor,
    to_uint8,
)
from imgsearch.errors import ConfigError


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _stripes(width: int, height: int) -> Image.Image:
    """Left third red, middle third green, right third blue."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    arr[:, :third, 0] = 255
    arr[:, third : 2 * third, 1] = 255
    arr[:, 2 * third :, 2] = 255
    return Image.fromarray(arr, "RGB")


def _manifest(tmp_path: Path, n: int = 3, *, with_sha: bool = True) -> pd.DataFrame:
    rows = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        img = (
            _noise(40 + 10 * i, 30 + 5 * i, seed=i).convert("RGBA")
            if i % 2
            else _noise(40, 30, seed=i)
        )
        img.save(path)
        row = {"image_id": f"im{i}", "item_id": f"it{i}", "uri": path.name, "path": str(path)}
        if with_sha:
            row["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        rows.append(row)
    return pd.DataFrame(rows)


# --- to_uint8 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["resize_center_crop", "letterbox", "squash"])
@pytest.mark.parametrize("size_in", [(80, 40), (30, 90), (5, 3), (64, 64), (1, 1)])
def test_every_policy_gives_a_square_uint8(policy: str, size_in: tuple[int, int]) -> None:
    cfg = PreprocessConfig(size=32, resize=policy)
    out = to_uint8(_noise(*size_in), cfg)
    assert out.shape == (32, 32, 3)
    assert out.dtype == np.uint8


@pytest.mark.parametrize("policy", ["resize_center_crop", "letterbox", "squash"])
def test_same_input_gives_the_same_bytes(tmp_path: Path, policy: str) -> None:
    path = tmp_path / "a.png"
    _noise(97, 61, seed=3).save(path)
    cfg = PreprocessConfig(
        size=48, resize=policy, brightness=1.2, contrast=0.8, interpolation="bicubic"
    )
    first = to_uint8(imageio.open_rgb(path), cfg)
    second = to_uint8(imageio.open_rgb(path.read_bytes()), cfg)
    assert first.tobytes() == second.tobytes()


def test_center_crop_keeps_the_centre_and_squash_keeps_the_sides() -> None:
    img = _stripes(120, 30)  # green spans x 40..80: the central square and its filter margin
    crop = to_uint8(img, PreprocessConfig(size=16, resize="resize_center_crop"))
    assert (crop[..., 1] == 255).all() and (crop[..., 0] == 0).all() and (crop[..., 2] == 0).all()
    squash = to_uint8(img, PreprocessConfig(size=16, resize="squash"))
    assert tuple(squash[8, 0]) == (255, 0, 0) and tuple(squash[8, -1]) == (0, 0, 255)


def test_letterbox_pads_with_the_background_colour() -> None:
    img = Image.new("RGB", (80, 40), (10, 200, 30))
    out = to_uint8(img, PreprocessConfig(size=20, resize="letterbox"))
    fill = imageio.BACKGROUND
    assert (out[:5] == fill).all() and (out[-5:] == fill).all()  # 80x40 -> 20x10 centred
    assert (out[5:15] == (10, 200, 30)).all()


def test_brightness_and_contrast_apply() -> None:
    img = _noise(20, 20)
    base = to_uint8(img, PreprocessConfig(size=20))
    assert not to_uint8(img, PreprocessConfig(size=20, brightness=0.0)).any()
    assert to_uint8(img, PreprocessConfig(size=20, brightness=1.5)).mean() > base.mean()
    flat = to_uint8(img, PreprocessConfig(size=20, contrast=0.0))
    assert flat.std() < 1.0 < base.std()


def test_to_uint8_refuses_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        to_uint8(Image.new("RGBA", (4, 4)), PreprocessConfig(size=4))


# --- to_tensor ------------------------------------------------------------------------------------


def test_normalisation_matches_a_hand_computation() -> None:
    cfg = PreprocessConfig(size=5)
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    expected = np.empty((3, 5, 5), dtype=np.float64)
    for c in range(3):
        for y in range(5):
            for x in range(5):
                expected[c, y, x] = (arr[y, x, c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    single = to_tensor(arr, cfg)
    assert single.dtype == torch.float32 and single.shape == (3, 5, 5)
    np.testing.assert_allclose(single.numpy(), expected, atol=1e-5)

    batch = to_tensor(np.stack([arr, arr[::-1]]), cfg)
    assert batch.shape == (2, 3, 5, 5)
    np.testing.assert_allclose(batch[0].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(batch[1].numpy(), expected[:, ::-1], atol=1e-5)


def test_to_tensor_accepts_read_only_arrays_and_refuses_bad_input() -> None:
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr.flags.writeable = False
    assert to_tensor(arr, PreprocessConfig()).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((4, 4, 3), dtype=np.float32), PreprocessConfig())
    with pytest.raises(ValueError, match="H, W, 3"):
        to_tensor(np.zeros((3, 4, 4), dtype=np.uint8), PreprocessConfig())


# --- config ---------------------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    cfg = PreprocessConfig(
        size=96, resize="letterbox", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), contrast=1.1
    )
    back = PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert isinstance(back.mean, tuple) and isinstance(back.std, tuple)
    assert back.cache_key() == cfg.cache_key()


def test_cache_key_changes_with_every_field_that_shapes_the_array() -> None:
    base = PreprocessConfig()
    variants = [
        PreprocessConfig(size=225),
        PreprocessConfig(resize="squash"),
        PreprocessConfig(brightness=1.1),
        PreprocessConfig(contrast=0.9),
        PreprocessConfig(interpolation="bicubic"),
    ]
    keys = {base.cache_key(), *(v.cache_key() for v in variants)}
    assert len(keys) == len(variants) + 1


@pytest.mark.parametrize("policy", ["resize_center_crop", "letterbox", "squash"])
def test_mean_and_std_are_not_in_the_key_because_the_array_ignores_them(policy: str) -> None:
    a = PreprocessConfig(size=16, resize=policy)
    b = PreprocessConfig(size=16, resize=policy, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert a.cache_key() == b.cache_key()
    img = _noise(40, 24)
    assert to_uint8(img, a).tobytes() == to_uint8(img, b).tobytes()


@pytest.mark.parametrize(
    "bad",
    [
        {"size": 0},
        {"resize": "stretch"},
        {"mean": [0.5, 0.5]},
        {"std": [0.2, 0.0, 0.2]},
        {"interpolation": "cubic"},
    ],
)
def test_bad_config_is_a_config_error(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PreprocessConfig.from_dict(bad)


def test_unknown_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        PreprocessConfig.from_dict({"sise": 10})


def test_yaml_defaults_build_the_default_config() -> None:
    assert from_dict(PreprocessConfig, load_config()["preprocess"]) == PreprocessConfig()


# --- preprocess over a manifest ---------------------------------------------------------------------


def test_preprocess_caches_and_a_second_run_decodes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path)
    cfg = PreprocessConfig(size=24)
    cache = tmp_path / "cache"

    first = preprocess(manifest, cfg, cache, progress=False)
    assert first.metrics["cache_misses"] == 3 and first.metrics["cache_hits"] == 0
    assert first.quarantine.empty and len(first.manifest) == 3
    for _, row in first.manifest.iterrows():
        assert Path(row[schema.PRE_PATH]) == cache_path(cache, cfg, row[schema.SHA256])
        assert Path(row[schema.PRE_PATH]).parent.name == row[schema.SHA256][:2]
        expected = to_uint8(imageio.open_rgb(row[schema.PATH]), cfg)
        assert load_uint8(row[schema.PRE_PATH]).tobytes() == expected.tobytes()
    assert not list(cache.rglob("*.tmp"))

    calls = []
    real = imageio.open_rgb

    def counting(source: object) -> Image.Image:
        calls.append(source)
        return real(source)  # type: ignore[arg-type]

    monkeypatch.setattr(imageio, "open_rgb", counting)
    second = preprocess(manifest, cfg, cache, progress=False)
    assert calls == []
    assert second.metrics["cache_hits"] == 3 and second.metrics["cache_misses"] == 0
    assert second.manifest[schema.PRE_PATH].tolist() == first.manifest[schema.PRE_PATH].tolist()

    # another config is another cache entry: decoded again
    third = preprocess(manifest, PreprocessConfig(size=25), cache, progress=False)
    assert len(calls) == 3 and third.metrics["cache_misses"] == 3


def test_same_content_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _manifest(tmp_path, n=1)
    twin = manifest.assign(image_id="twin", item_id="other")
    calls = []
    real = imageio.open_rgb
    monkeypatch.setattr(imageio, "open_rgb", lambda src: calls.append(src) or real(src))
    result = preprocess(
        pd.concat([manifest, twin], ignore_index=True),
        PreprocessConfig(size=8),
        tmp_path / "c",
        progress=False,
    )
    assert len(calls) == 1
    assert result.manifest[schema.PRE_PATH].nunique() == 1 and len(result.manifest) == 2


def test_sha256_is_computed_when_the_manifest_has_none(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, n=2, with_sha=False)
    result = preprocess(manifest, PreprocessConfig(size=8), tmp_path / "c", progress=False)
    for _, row in result.manifest.iterrows():
        sha = hashlib.sha256(Path(row[schema.PATH]).read_bytes()).hexdigest()
        assert Path(row[schema.PRE_PATH]).stem == sha


def test_failures_go_to_quarantine_and_the_batch_goes_on(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, n=2, with_sha=False)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    bad = pd.DataFrame(
        [
            {"image_id": "garbage", "item_id": "x", "uri": "garbage.png", "path": str(garbage)},
            {
                "image_id": "gone",
                "item_id": "y",
                "uri": "gone.png",
                "path": str(tmp_path / "gone.png"),
            },
            {"image_id": "nopath", "item_id": "z", "uri": "z.png", "path": None},
        ]
    )
    result = preprocess(
        pd.concat([manifest, bad], ignore_index=True),
        PreprocessConfig(size=8),
        tmp_path / "c",
        progress=False,
    )
    assert result.manifest["image_id"].tolist() == ["im0", "im1"]
    assert result.manifest[schema.PRE_PATH].notna().all()
    q = result.quarantine.set_index("image_id")
    assert sorted(q.index) == ["garbage", "gone", "nopath"]
    assert (q["stage"] == "preprocess").all()
    assert q.loc["gone", "reason"] == "missing_file" and q.loc["nopath", "reason"] == "missing_file"
    assert q.loc["garbage", "reason"] and q.loc["garbage", "reason"] != "missing_file"
    assert list(result.quarantine.columns) == list(schema.QUARANTINE_COLUMNS)
    assert (
        result.metrics["n"] == 5 and result.metrics["n_ok"] == 2 and result.metrics["n_failed"] == 3
    )


def test_an_unexpected_error_is_a_quarantine_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path, n=2)

    def flaky(source: object) -> Image.Image:
        if "img1" in str(source):
            raise MemoryError("boom")
        return Image.new("RGB", (4, 4))

    monkeypatch.setattr(imageio, "open_rgb", flaky)
    result = preprocess(manifest, PreprocessConfig(size=4), tmp_path / "c", progress=False)
    assert result.manifest["image_id"].tolist() == ["im0"]
    assert result.quarantine["reason"].tolist() == ["preprocess_failed"]
    assert "MemoryError" in result.quarantine["detail"].iloc[0]


def test_empty_manifest(tmp_path: Path) -> None:
    empty = pd.DataFrame(columns=["image_id", "item_id", "uri", "path"])
    result = preprocess(empty, PreprocessConfig(size=4), tmp_path / "c", progress=False)
    assert result.manifest.empty and schema.PRE_PATH in result.manifest.columns
    assert result.quarantine.empty and result.metrics["n"] == 0


def test_worker_processes_give_the_same_result_as_one_process(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, n=10, with_sha=False)
    bad = pd.DataFrame(
        [{"image_id": "bad", "item_id": "b", "uri": "bad", "path": str(tmp_path / "img0.txt")}]
    )
    (tmp_path / "img0.txt").write_text("not an image")
    manifest = pd.concat([manifest, bad], ignore_index=True)
    cfg = PreprocessConfig(size=16)
    pooled = preprocess(manifest, cfg, tmp_path / "pooled", workers=2, progress=False)
    single = preprocess(manifest, cfg, tmp_path / "single", workers=1, progress=False)
    assert (
        pooled.manifest["image_id"].tolist()
        == single.manifest["image_id"].tolist()
        == [f"im{i}" for i in range(10)]
    )
    for a, b in zip(
        pooled.manifest[schema.PRE_PATH], single.manifest[schema.PRE_PATH], strict=True
    ):
        assert load_uint8(a).tobytes() == load_uint8(b).tobytes()
    assert pooled.quarantine.drop(columns="detail").equals(single.quarantine.drop(columns="detail"))
    assert pooled.quarantine["reason"].tolist() == ["not_an_image"]
