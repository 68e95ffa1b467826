"""Data augmentation for contrastive fine-tuning (torchvision.transforms.v2).

The pipelines follow the papers' recipes, on uint8 ``(3, H, W)`` tensors at the training
resolution, and end by normalising with the extractor's mean/std:

    random resized crop -> horizontal flip -> colour jitter (p) -> grayscale (p) -> gaussian blur (p)
    -> float in [0, 1] -> (x - mean) / std

Paper presets (:func:`paper_augment`):

- ``simclr``: Chen et al. 2020, appendix A: crop scale (0.08, 1), jitter strength s=1 (0.8, 0.8,
  0.8, 0.2) with p=0.8, grayscale p=0.2, blur p=0.5 with sigma in (0.1, 2) and a kernel of 10% of
  the image side.
- ``moco``: MoCo v2 (Chen, Fan, Girshick, He 2020): crop scale (0.2, 1), jitter (0.4, 0.4, 0.4,
  0.1) p=0.8, grayscale p=0.2, blur p=0.5 sigma (0.1, 2).
- ``supcon``: Khosla et al. 2020 (their reference code): crop scale (0.2, 1), jitter (0.4, 0.4,
  0.4, 0.1) p=0.8, grayscale p=0.2, no blur.

Colour jitter and grayscale matter most when the same item comes in different styles (the emoji
demo: four vendors colour the same emoji differently), crops when it comes at different scales.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2

from imgsearch.config import from_dict
from imgsearch.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class AugmentConfig:
    """Augmentation parameters (defaults: MoCo v2's recipe). Probabilities are in [0, 1].

    ``crop_scale``/``crop_ratio``: :class:`~torchvision.transforms.v2.RandomResizedCrop` area
    fraction and aspect ratio ranges. ``brightness``..``hue``: :class:`ColorJitter` strengths,
    applied with probability ``jitter_p``. ``blur_kernel_frac``: the blur kernel side as a
    fraction of the image side (rounded to an odd number >= 3). ``rotation``: degrees of a
    random rotation (0 = none; not in the papers, offered for drawings).
    """

    crop_scale: Sequence[float] = (0.2, 1.0)
    crop_ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Sequence[float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    rotation: float = 0.0

    def __post_init__(self) -> None:
        self.crop_scale = _pair(self.crop_scale, "crop_scale")
        self.crop_ratio = _pair(self.crop_ratio, "crop_ratio")
        self.blur_sigma = _pair(self.blur_sigma, "blur_sigma")
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ConfigError(
                f"augment.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}"
            )
        if not (0 < self.crop_ratio[0] <= self.crop_ratio[1]):
            raise ConfigError(
                f"augment.crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}"
            )
        if not (0 < self.blur_sigma[0] <= self.blur_sigma[1]):
            raise ConfigError(
                f"augment.blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}"
            )
        for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{name} must be in [0, 1], got {value}")
            setattr(self, name, value)
        for name in ("brightness", "contrast", "saturation", "blur_kernel_frac", "rotation"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"augment.{name} must be >= 0, got {value}")
            setattr(self, name, value)
        self.hue = float(self.hue)
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"augment.hue must be in [0, 0.5], got {self.hue}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("crop_scale", "crop_ratio", "blur_sigma"):
            out[key] = list(out[key])
        return out


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"augment.{name} must be two numbers, got {value!r}") from exc
    if len(items) != 2:
        raise ConfigError(f"augment.{name} must be two numbers, got {value!r}")
    return (items[0], items[1])


PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "simclr": {
        "crop_scale": (0.08, 1.0),
        "brightness": 0.8,
        "contrast": 0.8,
        "saturation": 0.8,
        "hue": 0.2,
        "blur_p": 0.5,
    },
    "moco": {},
    "supcon": {"blur_p": 0.0},
}


def paper_augment(method: str) -> AugmentConfig:
    """The augmentation recipe of ``method``'s paper (``simclr``, ``moco``, ``supcon``)."""
    if method not in PAPER_PRESETS:
        raise ConfigError(
            f"no augmentation preset for method {method!r}; known: {sorted(PAPER_PRESETS)}"
        )
    return AugmentConfig(**PAPER_PRESETS[method])


def as_augment_config(value: AugmentConfig | dict[str, Any] | None, method: str) -> AugmentConfig:
    """``None`` -> the paper preset of ``method``; a dict -> that preset updated with the dict."""
    if isinstance(value, AugmentConfig):
        return value
    if value is None:
        return paper_augment(method)
    if not isinstance(value, dict):
        raise ConfigError(f"augment must be a mapping or None, got {type(value).__name__}")
    base = paper_augment(method).to_dict() if method in PAPER_PRESETS else {}
    return from_dict(AugmentConfig, {**base, **value})


def blur_kernel(size: int, frac: float) -> int:
    """An odd kernel side, ``frac`` of ``size``, at least 3."""
    k = max(3, int(round(size * frac)))
    return k if k % 2 == 1 else k + 1


def train_transform(
    cfg: AugmentConfig, size: int, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    """Random augmentation of one uint8 ``(3, H, W)`` tensor -> float ``(3, size, size)``, normalised.

    Uses torch's global RNG (seed it, or wrap in :func:`torch.random.fork_rng`, for repeatability).
    """
    if size < 8:
        raise ConfigError(f"training size must be >= 8 pixels, got {size}")
    steps: list[Any] = [
        v2.RandomResizedCrop(
            size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), antialias=True
        )
    ]
    if cfg.rotation > 0:
        # white fill: drawings sit on a white background after alpha compositing
        steps.append(v2.RandomRotation(cfg.rotation, fill=255))
    if cfg.hflip_p > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip_p))
    if cfg.jitter_p > 0 and any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
        jitter = v2.ColorJitter(
            brightness=cfg.brightness or None,
            contrast=cfg.contrast or None,
            saturation=cfg.saturation or None,
            hue=cfg.hue or None,
        )
        steps.append(v2.RandomApply([jitter], p=cfg.jitter_p))
    if cfg.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(cfg.grayscale_p))
    if cfg.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel(size, cfg.blur_kernel_frac), sigma=tuple(cfg.blur_sigma))
        steps.append(v2.RandomApply([blur], p=cfg.blur_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Deterministic: uint8 ``(..., 3, H, W)`` -> float, resized to ``size`` when needed, normalised."""
    return v2.Compose(
        [
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def augment_batch(images: torch.Tensor, transform: v2.Compose) -> torch.Tensor:
    """Apply ``transform`` to each uint8 image of ``(N, 3, H, W)`` independently -> ``(N, 3, S, S)``.

    (A v2 transform called on a batch draws one set of random parameters for the whole batch;
    contrastive learning needs independent views, hence the loop.)
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return torch.stack([transform(img) for img in images])
