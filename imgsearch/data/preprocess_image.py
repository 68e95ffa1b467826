"""How one image becomes model input: :class:`PreprocessConfig`, :func:`to_uint8`, :func:`to_tensor`.

:func:`to_uint8` turns a decoded RGB image into a ``(size, size, 3)`` uint8 array (what the cache of
:mod:`imgsearch.data.preprocess` stores) and :func:`to_tensor` turns such arrays into a normalised
float tensor at batch time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torchvision.transforms.v2 import functional as F

from imgsearch.config import from_dict as _config_from_dict
from imgsearch.data import imageio
from imgsearch.errors import ConfigError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

RESIZE_POLICIES = ("resize_center_crop", "letterbox", "squash")
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

#: Fields that do not change what :func:`to_uint8` produces (only :func:`to_tensor` uses them).
UINT8_INDEPENDENT_FIELDS = ("mean", "std")

#: Bump when :func:`to_uint8` changes what it produces for the same config: it is part of the
#: cache key, so old cache entries are never served for new code.
ALGORITHM_VERSION = 1


@dataclass
class PreprocessConfig:
    """How an image becomes model input.

    ``resize``: ``resize_center_crop`` scales the shorter side to ``size`` and crops the centre;
    ``letterbox`` scales the longer side to ``size`` and pads to a square with
    :data:`imgsearch.data.imageio.BACKGROUND`, the colour transparency is composited on, so padding
    looks like "nothing there"; ``squash`` resizes to ``size x size`` ignoring the aspect ratio.
    ``brightness``/``contrast`` are :mod:`PIL.ImageEnhance` factors (1.0 = unchanged).
    """

    size: int = 224
    resize: str = "resize_center_crop"
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    brightness: float = 1.0
    contrast: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # YAML and JSON give lists; tuples keep the config hashable and its round-trip exact.
        self.mean = _triple(self.mean, "mean")
        self.std = _triple(self.std, "std")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"PreprocessConfig.size must be a positive int, got {self.size!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(
                f"PreprocessConfig.resize must be one of {RESIZE_POLICIES}, got {self.resize!r}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"PreprocessConfig.interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"PreprocessConfig.std must be > 0, got {self.std}")
        for name in ("brightness", "contrast"):
            value = float(getattr(self, name))
            if not value >= 0:  # also refuses NaN
                raise ConfigError(f"PreprocessConfig.{name} must be >= 0, got {value}")
            setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; :meth:`from_dict` rebuilds an equal config."""
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return _config_from_dict(cls, data)

    def cache_key(self) -> str:
        """Short hash of the canonical JSON of the fields :func:`to_uint8` depends on (plus
        :data:`ALGORITHM_VERSION`). ``mean``/``std`` are left out on purpose: they act in
        :func:`to_tensor`, at batch time, so extractors that differ only there share cached arrays."""
        payload = {"algorithm_version": ALGORITHM_VERSION, **self.to_dict()}
        for name in UINT8_INDEPENDENT_FIELDS:
            del payload[name]
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"PreprocessConfig.{name} must be 3 numbers, got {value!r}") from exc
    if len(items) != 3:
        raise ConfigError(f"PreprocessConfig.{name} must be 3 numbers, got {value!r}")
    return (items[0], items[1], items[2])


# --- single image -------------------------------------------------------------------------------


def to_uint8(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Resize (and adjust) an RGB image into a ``(cfg.size, cfg.size, 3)`` uint8 array.

    Pillow's resampling filters antialias when downscaling and are deterministic: the same image
    and config give the same bytes. Raises ``ValueError`` when ``img`` is not RGB (decode with
    :func:`imgsearch.data.imageio.open_rgb`, which composites alpha and converts modes).
    """
    if img.mode != "RGB":
        raise ValueError(f"to_uint8 expects an RGB image, got mode {img.mode!r}")
    width, height = img.size
    if width < 1 or height < 1:
        raise ValueError(f"empty image: {width}x{height}")
    size, resample = cfg.size, INTERPOLATIONS[cfg.interpolation]

    if cfg.resize == "squash":
        out = img.resize((size, size), resample)
    elif cfg.resize == "resize_center_crop":
        # One resample from the central square of the source: the same as resizing the shorter
        # side to `size` and cropping the centre, without rounding in an intermediate image.
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        out = img.resize((size, size), resample, box=(left, top, left + side, top + side))
    else:  # letterbox
        scale = size / max(width, height)
        new_w = min(size, max(1, round(width * scale)))
        new_h = min(size, max(1, round(height * scale)))
        out = Image.new("RGB", (size, size), imageio.BACKGROUND)
        out.paste(img.resize((new_w, new_h), resample), ((size - new_w) // 2, (size - new_h) // 2))

    if cfg.brightness != 1.0:
        out = ImageEnhance.Brightness(out).enhance(cfg.brightness)
    if cfg.contrast != 1.0:
        out = ImageEnhance.Contrast(out).enhance(cfg.contrast)
    return np.asarray(out, dtype=np.uint8)


def to_tensor(arr: np.ndarray | torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` or ``(N, H, W, 3)`` -> float32 ``(3, H, W)`` / ``(N, 3, H, W)``, ``(x/255 - mean) / std``."""
    if isinstance(arr, np.ndarray):
        # torch refuses to share read-only memory (np.load/mmap arrays): copy those only.
        arr = np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()
        tensor = torch.from_numpy(arr)
    else:
        tensor = arr
    if tensor.dtype != torch.uint8:
        raise ValueError(f"to_tensor expects uint8 input, got {tensor.dtype}")
    if tensor.ndim not in (3, 4) or tensor.shape[-1] != 3:
        raise ValueError(f"to_tensor expects (H, W, 3) or (N, H, W, 3), got {tuple(tensor.shape)}")
    chw = tensor.movedim(-1, -3).contiguous()
    scaled = F.to_dtype(chw, torch.float32, scale=True)
    return F.normalize(scaled, mean=list(cfg.mean), std=list(cfg.std))


def images_to_tensor(images: Sequence[Image.Image], cfg: PreprocessConfig) -> torch.Tensor:
    """Decoded query images (any PIL mode: :func:`imageio.as_rgb`) -> ``(N, 3, S, S)``, exactly as
    batch extraction preprocesses a file (:func:`to_uint8` then :func:`to_tensor`)."""
    return to_tensor(np.stack([to_uint8(imageio.as_rgb(img), cfg) for img in images]), cfg)


def load_uint8(path: str | Path) -> np.ndarray:
    """Read one cached array (``pre_path``) without ever unpickling."""
    return np.load(path, allow_pickle=False)
