"""Shared by the fine-tuning tests: a synthetic catalogue of real image files and a tiny backbone.

Items are coloured shapes; the "vendors" draw each item on a different background (and shift it
a pixel), so an untrained network groups images by vendor and fine-tuning must learn to group
them by item - on val items it never trained on.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from imgsearch import schema
from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.models import backbones
from imgsearch.models.backbones import Backbone, Built, Extractor, ExtractorSpec, features_blocks
from imgsearch.train.finetune import FinetuneConfig

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
COLOURS = ((230, 40, 40), (40, 160, 40), (40, 40, 230), (150, 60, 150))
BACKGROUNDS = {"a": (255, 255, 255), "b": (20, 20, 20), "c": (90, 90, 220), "d": (240, 200, 60)}
SIZE = 32


def _draw(
    shape: str, colour: tuple[int, int, int], bg: tuple[int, int, int], shift: int
) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(im)
    lo, hi, mid = 6 + shift, SIZE - 6 + shift, SIZE // 2 + shift
    if shape == "circle":
        d.ellipse([lo, lo, hi, hi], fill=colour)
    elif shape == "square":
        d.rectangle([lo, lo, hi, hi], fill=colour)
    elif shape == "triangle":
        d.polygon([(mid, lo), (lo, hi), (hi, hi)], fill=colour)
    elif shape == "cross":
        d.rectangle([mid - 3, lo, mid + 3, hi], fill=colour)
        d.rectangle([lo, mid - 3, hi, mid + 3], fill=colour)
    elif shape == "ring":
        d.ellipse([lo, lo, hi, hi], outline=colour, width=4)
    else:
        d.rectangle([lo, mid - 4, hi, mid + 4], fill=colour)
    return im


def shapes_catalog(root: Path) -> pd.DataFrame:
    """24 items (shape x colour) x 4 vendors, 32 px PNGs under ``root``; every third item is a
    val item."""
    rows = []
    for shape in SHAPES:
        for c, colour in enumerate(COLOURS):
            item = f"{shape}-{c}"
            for v, (vendor, bg) in enumerate(BACKGROUNDS.items()):
                path = root / f"{item}-{vendor}.png"
                _draw(shape, colour, bg, v - 1).save(path)
                rows.append(
                    {
                        schema.IMAGE_ID: f"{item}/{vendor}",
                        schema.ITEM_ID: item,
                        schema.URI: path.name,
                        schema.PATH: str(path),
                        "vendor": vendor,
                    }
                )
    df = pd.DataFrame(rows)
    items = sorted(df[schema.ITEM_ID].unique())
    val = set(items[::3])
    df[schema.SPLIT] = ["val" if i in val else "train" for i in df[schema.ITEM_ID]]
    return df


class TinyBody(nn.Module):
    """Three conv blocks under ``features`` (so ``freeze_blocks`` finds them), then global pooling."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU()),
            nn.Sequential(nn.Conv2d(32, dim, 3, 1, 1), nn.BatchNorm2d(dim), nn.ReLU()),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def register_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the tiny test backbone, declaring its block layout like every backbone does."""

    def build(imagenet: bool) -> Built:
        return Built(TinyBody(32), 32, PreprocessConfig(size=SIZE), ())

    monkeypatch.setitem(
        backbones.REGISTRY, "tiny", Backbone(build, features_blocks, pooled_blocks=True)
    )


def tiny_extractor(seed: int = 0, dim: int = 32) -> Extractor:
    torch.manual_seed(seed)
    spec = ExtractorSpec("tiny", "none", dim, PreprocessConfig(size=SIZE))
    return Extractor(TinyBody(dim), spec).eval()


def fast_cfg(**kw: object) -> FinetuneConfig:
    base: dict[str, object] = {
        "method": "supcon",
        "epochs": 8,
        "batch_size": 32,
        "lr": 3e-3,
        "head_dims": [],
        "patience": 20,
        "freeze_bn": False,
        "warmup_epochs": 0,
        "augment": {"crop_scale": [0.7, 1.0], "jitter_p": 0.0, "grayscale_p": 0.0},
        "channels_last": False,
    }
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]
