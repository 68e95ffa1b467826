"""The query-time forward pass (:mod:`imgsearch.search.query`): thread count and the gated speed-ups,
on a tiny conv/BN network (fast) and a 64 px MobileNetV2."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor, ExtractorSpec, create_extractor
from imgsearch.search import query as serving
from imgsearch.search.query import embed_images
from registry import models


def _tiny() -> Extractor:
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    for module in body.modules():  # non-trivial BN statistics, so folding has work to do
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    spec = ExtractorSpec("tiny", "none", 16, PreprocessConfig(size=32))
    return Extractor(body, spec).eval()


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_threads_and_mode_come_from_env_then_config_then_default() -> None:
    assert serving.resolve_threads(None, env={}) == serving.DEFAULT_THREADS == 1
    assert serving.resolve_threads(2, env={}) == 2
    assert serving.resolve_threads(2, env={serving.THREADS_ENV: "3"}) == 3
    assert serving.resolve_threads(None, env={serving.THREADS_ENV: "0"}) == 0
    for bad in ("-1", "two"):
        with pytest.raises(ConfigError):
            serving.resolve_threads(bad, env={})
    assert serving.resolve_mode(None, env={}) == serving.DEFAULT_MODE == "fused"
    assert serving.resolve_mode("int8", env={serving.MODE_ENV: "EAGER"}) == "eager"
    with pytest.raises(ConfigError):
        serving.resolve_mode("fp16", env={})


def test_torch_threads_restores_the_callers_setting() -> None:
    before = torch.get_num_threads()
    with serving.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with serving.torch_threads(0):  # 0 = leave torch's own
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("make", [_tiny, "mobilenet"], ids=["tiny", "mobilenet_v2"])
def test_fused_reproduces_eager(make: object) -> None:
    if make == "mobilenet":
        torch.manual_seed(0)
        ext = create_extractor("mobilenet_v2", weights="none")
        ext.spec = dataclasses.replace(ext.spec, preprocess=PreprocessConfig(size=64))
    else:
        ext = _tiny()
    images = _images(3)
    served = serving.prepare_serving(ext, "fused")
    assert served.mode == "fused" and served.metrics["fused_min_cosine"] >= serving.FUSED_MIN_COSINE
    assert served.memory_format == torch.channels_last
    assert served.model is not ext  # the original (its fingerprint) is left alone
    np.testing.assert_allclose(served.embed(images), embed_images(ext, images), atol=1e-4)
    eager = serving.prepare_serving(ext, "eager")
    assert eager.model is ext and eager.mode == "eager"


def _int8_images(n_items: int = 6, per_item: int = 3, seed: int = 1) -> serving.Int8Images:
    """Calibration images, and check images of ``n_items`` items (noisy copies of one picture)."""
    rng = np.random.default_rng(seed)
    check, labels = [], []
    for item in range(n_items):
        base = rng.integers(0, 256, (40, 48, 3)).astype(np.int16)
        for _ in range(per_item):
            noisy = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            check.append(Image.fromarray(noisy))
            labels.append(f"item{item}")
    return serving.Int8Images(_images(8, seed=seed + 1), check, labels)


def test_int8_is_calibrated_on_the_gallery_and_kept_on_map_at_r() -> None:
    ext = _tiny()
    served = serving.prepare_serving(ext, "int8", gallery=_int8_images())
    assert served.mode == "int8", served.metrics
    m = served.metrics
    assert m["int8_check_images"] == 18 and m["int8_calibration_images"] == 8
    assert m["int8_map_at_r_drop"] <= 0.005 and "drop" in m["int8_reason"]
    assert "int8 queries on fp32 gallery" in m["int8_reason"]
    assert 0 < m["int8_min_cosine"] <= 1  # recorded, not what decides
    queries = _images(4, seed=2)
    cosine = np.sum(served.embed(queries) * embed_images(ext, queries), axis=1)
    assert cosine.min() >= 0.98


def test_int8_falls_back_when_it_cannot_be_checked_or_fails_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ext = _tiny()
    few = serving.prepare_serving(ext, "int8", gallery=serving.Int8Images(_images(3)))
    assert few.mode == "fused" and "calibrate on" in few.metrics["int8_error"]
    single = serving.Int8Images(_images(8), _images(4, seed=3), ["a", "b", "c", "d"])
    lonely = serving.prepare_serving(ext, "int8", gallery=single)  # no item has two images
    assert lonely.mode == "fused" and "cannot be measured" in lonely.metrics["int8_error"]

    real_check = serving.quality_check

    def worse_int8(fp32: np.ndarray, int8: np.ndarray, *args: object, **kw: object) -> object:
        rng = np.random.default_rng(0)  # int8 vectors that lost the ranking
        return real_check(fp32, rng.normal(size=int8.shape), *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(serving, "quality_check", worse_int8)
    strict = serving.prepare_serving(ext, "int8", gallery=_int8_images())
    assert strict.mode == "fused" and "below fp32" in strict.metrics["int8_error"]
    assert strict.metrics["int8_map_at_r_drop"] > 0.005


def test_a_backbone_fx_cannot_trace_runs_eager() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = x.mean(dim=(2, 3))
            return pooled if float(pooled.sum()) > 0 else -pooled  # data-dependent: untraceable

    ext = Extractor(Branchy(), ExtractorSpec("branchy", "none", 3, PreprocessConfig(size=16)))
    served = serving.prepare_serving(ext, "fused")
    assert served.mode == "eager" and "fused_error" in served.metrics
    assert served.embed(_images(2)).shape == (2, 3)


def test_pyfunc_reads_threads_and_mode_from_config_and_env(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    ext = _tiny()
    context = SimpleNamespace(model_config={"torch_threads": 2, "serving_mode": "eager"})
    monkeypatch.delenv(serving.THREADS_ENV, raising=False)
    monkeypatch.delenv(serving.MODE_ENV, raising=False)
    served = models.prepare_serving(ext, context)
    assert (served.mode, served.threads) == ("eager", 2)
    monkeypatch.setenv(serving.THREADS_ENV, "1")
    monkeypatch.setenv(serving.MODE_ENV, "int8")
    meta = pd.DataFrame({"image_id": ["a"], "path": ["/nonexistent/a.png"]})
    served = models.prepare_serving(ext, context, meta)  # unreadable gallery: int8 refused
    assert (served.mode, served.threads) == ("fused", 1)
