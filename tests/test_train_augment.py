"""Pixel augmentation for fine-tuning: paper presets, overrides, independent views."""

from __future__ import annotations

import pytest
import torch

from imgsearch.errors import ConfigError
from imgsearch.train.augment import (
    AugmentConfig,
    as_augment_config,
    augment_batch,
    blur_kernel,
    paper_augment,
    train_transform,
)


def test_paper_presets_and_overrides() -> None:
    assert paper_augment("simclr").crop_scale == (0.08, 1.0) and paper_augment("simclr").hue == 0.2
    assert paper_augment("moco").blur_p == 0.5 and paper_augment("supcon").blur_p == 0.0
    merged = as_augment_config({"grayscale_p": 0.5}, "simclr")
    assert merged.grayscale_p == 0.5 and merged.brightness == 0.8
    with pytest.raises(ConfigError):
        paper_augment("byol")
    assert blur_kernel(96, 0.1) == 11 and blur_kernel(224, 0.1) == 23 and blur_kernel(8, 0.1) == 3


def test_train_transform_outputs_independent_normalised_views() -> None:
    torch.manual_seed(0)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    tf = train_transform(AugmentConfig(rotation=10.0), 24, mean, std)
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    views = augment_batch(img.expand(6, 3, 40, 40).contiguous(), tf)
    assert views.shape == (6, 3, 24, 24) and views.dtype == torch.float32
    assert views.min() >= (0 - 0.5) / 0.25 - 1e-5 and views.max() <= (1 - 0.5) / 0.25 + 1e-5
    assert not torch.allclose(views[0], views[1])  # each image gets its own random parameters
    plain = train_transform(
        AugmentConfig(
            crop_scale=(1.0, 1.0),
            crop_ratio=(1.0, 1.0),
            hflip_p=0,
            jitter_p=0,
            grayscale_p=0,
            blur_p=0,
        ),
        40,
        mean,
        std,
    )
    expected = (img.float() / 255 - 0.5) / 0.25
    assert torch.allclose(plain(img), expected, atol=1e-6)  # identity crop: only normalised
    with pytest.raises(ValueError):
        augment_batch(img.float().unsqueeze(0), tf)
