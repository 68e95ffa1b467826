"""Block layouts: each registered backbone declares its blocks (what ``freeze_blocks`` counts)."""

from __future__ import annotations

import pytest
import torch

from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import (
    REGISTRY,
    Extractor,
    ExtractorSpec,
    backbone_blocks,
    create_extractor,
)
from tests.train_data import TinyBody

#: blocks per backbone: MobileNetV2 features[0..18]; ResNet stem + 4 stages; EfficientNet stem +
#: 16 MBConv blocks + head; CLIP ViT-B/32: stem + 12 residual blocks + ln_post/projection
EXPECTED = {
    "mobilenet_v2": 19,
    "resnet50": 5,
    "efficientnet_b0": 18,
    "efficientnet_lite0": 18,
    "clip_vit_b32": 14,
}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_declared_blocks_cover_the_whole_body_in_order(name: str) -> None:
    try:
        ext = create_extractor(name, "none")
    except ImportError:  # an optional backbone package that is not installed
        pytest.skip(f"{name} is not installed")
    blocks = backbone_blocks(ext)
    assert len(blocks) == EXPECTED[name]
    in_blocks = [id(p) for block in blocks for p in block.parameters()]
    assert len(in_blocks) == len(set(in_blocks))  # no parameter in two blocks
    assert set(in_blocks) == {id(p) for p in ext.body.parameters()}  # and none left out
    first = next(blocks[0].parameters())
    assert first.ndim == 4 and first.shape[1] == 3  # the first block takes the RGB input


def test_blocks_of_a_backbone_that_declares_none_are_a_config_error() -> None:
    torch.manual_seed(0)
    ext = Extractor(
        TinyBody(8), ExtractorSpec("unregistered", "none", 8, PreprocessConfig(size=16))
    )
    with pytest.raises(ConfigError, match="do not know the blocks"):
        backbone_blocks(ext)


def test_only_pooled_layouts_offer_the_frozen_trunk_cache() -> None:
    pooled = {name for name, entry in REGISTRY.items() if entry.pooled_blocks}
    assert pooled == {"mobilenet_v2"}
