"""``clip``: OpenCLIP's text and image towers (Radford et al. 2021; Cherti et al. 2023).

:class:`ClipTower` loads one OpenCLIP model with ``open_clip.create_model_and_transforms`` and
exposes both towers into the same ``embed_dim`` space: :meth:`ClipTower.encode` for texts (the
:class:`~imgsearch.models.text_base.TextTower` protocol) and :meth:`ClipTower.encode_images` /
:meth:`ClipTower.image_tower` for images. What users with a network pick first::

    tower = ClipTower("ViT-B-32", pretrained="laion2b_s34b_b79k")

downloads the weights from the Hugging Face hub (``WeightsUnavailableError`` when that fails;
no CLIP weights ship in any package here). ``model_cfg=`` builds any architecture from an
OpenCLIP config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) with random weights:
:data:`TINY_CONFIG` is a few-hundred-kB one for tests.

Saved in OpenCLIP's own ``local-dir:`` layout (``open_clip_config.json`` with ``model_cfg`` and
``preprocess_cfg``, weights in ``open_clip_model.safetensors``) plus ``tower.json``: loading
goes through ``create_model_and_transforms("local-dir:<dir>")``, safetensors only, no pickle.

The image tower as an image backbone (:mod:`imgsearch.models.backbones`): :func:`clip_image_tower`
returns the vision module (``(N, 3, S, S)`` -> ``(N, embed_dim)``), its
:class:`~imgsearch.data.preprocess.PreprocessConfig` and the dimension, which is what a backbone
builder returns.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.errors import ConfigError, WeightsUnavailableError
from imgsearch.models.text_base import (
    check_texts,
    hash_update_tensors,
    l2_normalize,
    read_meta,
    write_meta,
)

log = logging.getLogger(__name__)

KIND = "clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"  # the first name OpenCLIP's local-dir loader looks for

#: A tiny randomly initialised CLIP (ViT vision tower, transformer text tower) for tests: the
#: BPE vocabulary of OpenCLIP's tokenizer is kept (49408), everything else is minimal.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

# OpenCLIP's inference resize modes -> imgsearch's resize policies.
_RESIZE = {"shortest": "resize_center_crop", "longest": "letterbox", "squash": "squash"}


@contextlib.contextmanager
def _local_dir(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any]) -> Iterator[str]:
    """A throw-away OpenCLIP ``local-dir:`` holding only a config (so: random weights)."""
    with tempfile.TemporaryDirectory(prefix="imgsearch-clip-") as tmp:
        config = {"model_cfg": dict(model_cfg), "preprocess_cfg": dict(preprocess_cfg)}
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config))
        yield f"local-dir:{tmp}"


def _create(
    model_name: str, pretrained: str | None, model_cfg: Mapping[str, Any] | None
) -> tuple[nn.Module, Callable[..., Any], Any, dict[str, Any]]:
    """(model, val transform, tokenizer, model_cfg) from OpenCLIP, eval mode, on the CPU."""
    import open_clip

    if model_cfg is not None:
        cfg = copy.deepcopy(dict(model_cfg))
        with _local_dir(cfg, {}) as source:
            model, _, transform = open_clip.create_model_and_transforms(source)
            tokenizer = open_clip.get_tokenizer(source)
        return model.eval(), transform, tokenizer, cfg
    if model_name.startswith("local-dir:"):
        source = model_name
        config = json.loads((Path(model_name.removeprefix("local-dir:")) / CONFIG_FILE).read_text())
        cfg = config["model_cfg"]
    else:
        source = model_name
        found = open_clip.get_model_config(model_name)
        if found is None:
            raise ConfigError(f"unknown OpenCLIP model {model_name!r}; see open_clip.list_models()")
        cfg = copy.deepcopy(found)
    quick_gelu = False
    if pretrained and not model_name.startswith("local-dir:"):
        tag = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        quick_gelu = bool(tag.get("quick_gelu", False))  # OpenAI's weights were trained with it
        if quick_gelu:
            cfg["quick_gelu"] = True
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            source, pretrained=pretrained, force_quick_gelu=quick_gelu, weights_only=True
        )
    except (RuntimeError, OSError, ValueError) as exc:
        raise WeightsUnavailableError(
            f"OpenCLIP {model_name!r} with pretrained={pretrained!r} cannot be loaded "
            f"({type(exc).__name__}: {str(exc)[:300]}). CLIP weights download from the Hugging "
            "Face hub; offline, use model_cfg= (random init) or a saved clip tower directory."
        ) from exc
    return model.eval(), transform, open_clip.get_tokenizer(source), cfg


def preprocess_config(model: nn.Module) -> PreprocessConfig:
    """The model's OpenCLIP inference preprocessing as an imgsearch :class:`PreprocessConfig`."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ConfigError(f"CLIP input size {size} is not square; imgsearch needs a square")
        size = size[0]
    interpolation = cfg.get("interpolation", "bicubic")
    return PreprocessConfig(
        size=int(size),
        resize=_RESIZE.get(cfg.get("resize_mode", "shortest"), "resize_center_crop"),
        mean=cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
        std=cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
    )


@dataclass(frozen=True)
class ClipImageTower:
    """The image side of a CLIP model as a backbone: ``module`` maps ``(N, 3, S, S)`` float
    (normalised as ``preprocess`` says) to ``(N, dim)`` unnormalised features; ``transform`` is
    OpenCLIP's own PIL -> tensor inference transform (the same geometry and mean/std)."""

    module: nn.Module
    dim: int
    preprocess: PreprocessConfig
    transform: Callable[..., Any]


class ClipTower:
    """OpenCLIP text and image towers sharing one embedding space of size :attr:`dim`."""

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "laion2b_s34b_b79k",
        model_cfg: Mapping[str, Any] | None = None,
        batch_size: int = 256,
    ) -> None:
        self.model_name = model_name if model_cfg is None else "custom"
        self.pretrained = pretrained if model_cfg is None else None
        self.batch_size = int(batch_size)
        self.model, self.transform, self.tokenizer, self.model_cfg = _create(
            model_name, self.pretrained, model_cfg
        )
        self._fingerprint: str | None = None

    @property
    def name(self) -> str:
        return KIND

    @property
    def dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    def fit(self, texts: Sequence[str]) -> ClipTower:
        return self  # pretrained (or deliberately random): nothing learned from the catalog

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts, "clip.encode")
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size])
            feats = self.model.encode_text(tokens)  # type: ignore[operator]
            out.append(F.normalize(feats.float(), dim=1).numpy())
        return l2_normalize(np.concatenate(out))

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """``pixels``: ``(N, 3, S, S)`` float, preprocessed as :meth:`image_tower` says ->
        ``(N, dim)`` float32, L2 = 1, in the same space as :meth:`encode`."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ConfigError(
                f"clip.encode_images: expected (N, 3, S, S), got {tuple(pixels.shape)}"
            )
        feats = self.model.encode_image(pixels.float())  # type: ignore[operator]
        return l2_normalize(feats.float().numpy())

    def image_tower(self) -> ClipImageTower:
        visual = self.model.visual  # type: ignore[union-attr]
        assert isinstance(visual, nn.Module)
        return ClipImageTower(visual, self.dim, preprocess_config(self.model), self.transform)

    def _params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "batch_size": self.batch_size,
        }

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256(json.dumps(self.model_cfg, sort_keys=True).encode())
            hash_update_tensors(digest, self.model.state_dict())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def save(self, directory: Path) -> Path:
        import open_clip
        from safetensors.torch import save_model

        directory = write_meta(Path(directory), KIND, self._params(), self.fingerprint())
        config = {
            "model_cfg": self.model_cfg,
            "preprocess_cfg": open_clip.get_model_preprocess_cfg(self.model),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_model(self.model, str(directory / WEIGHTS_FILE))
        return directory

    @classmethod
    def load(cls, directory: Path) -> ClipTower:
        meta = read_meta(directory)
        if meta["kind"] != KIND:
            raise ConfigError(f"{directory} holds a {meta['kind']!r} tower, not {KIND!r}")
        if not (Path(directory) / WEIGHTS_FILE).is_file():
            raise WeightsUnavailableError(f"{directory}: no {WEIGHTS_FILE}")
        tower = cls(
            f"local-dir:{Path(directory).resolve()}",
            pretrained=None,
            batch_size=meta["params"]["batch_size"],
        )
        tower.model_name = meta["params"]["model_name"]
        tower.pretrained = meta["params"]["pretrained"]
        return tower


def clip_image_tower(
    model_name: str = "ViT-B-32",
    pretrained: str | None = "laion2b_s34b_b79k",
    model_cfg: Mapping[str, Any] | None = None,
) -> ClipImageTower:
    """The image tower of an OpenCLIP model, for use as an image backbone (see module doc)."""
    return ClipTower(model_name, pretrained, model_cfg).image_tower()
