"""Fine-tuning inputs: images through the embedding reader, PK / random batches, the frozen trunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from imgsearch import schema
from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import Extractor
from imgsearch.train.inputs import load_images, normaliser, split_at, trunk_outputs
from imgsearch.train.samplers import pk_batches, random_batches
from tests.train_data import SIZE, TinyBody, register_tiny, shapes_catalog, tiny_extractor


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return shapes_catalog(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(autouse=True)
def tiny_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny(monkeypatch)


def test_load_images_uses_pre_path_only_for_the_same_preprocessing(
    catalog: pd.DataFrame, tmp_path: Path
) -> None:
    cfg = PreprocessConfig(size=SIZE)
    cached = np.full((SIZE, SIZE, 3), 7, dtype=np.uint8)
    good = tmp_path / cfg.cache_key() / "ab" / "x.npy"
    other = (
        tmp_path / PreprocessConfig(size=SIZE, interpolation="bicubic").cache_key() / "ab" / "x.npy"
    )
    for p in (good, other):
        p.parent.mkdir(parents=True)
        np.save(p, cached)
    rows = catalog.iloc[:2].copy()
    rows[schema.PRE_PATH] = [str(good), str(other)]
    images, ok, failures = load_images(rows, cfg)
    assert ok.all() and failures.empty and images.shape == (2, 3, SIZE, SIZE)
    assert (images[0] == 7).all()  # from the cache
    assert not (images[1] == 7).all()  # another config's array: decoded from `path` instead
    decoded = np.asarray(Image.open(rows[schema.PATH].iloc[1]).convert("RGB"))
    assert np.array_equal(images[1].permute(1, 2, 0).numpy(), decoded)


def test_pk_batches_cover_every_item_once() -> None:
    codes = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 4, 4, 5])
    gen = torch.Generator().manual_seed(0)
    batches = pk_batches(codes, p=3, k=4, generator=gen)
    assert len(batches) == 2 and all(len(b) == 12 for b in batches)
    seen = sorted(int(codes[group[0]]) for b in batches for group in b.numpy().reshape(3, 4))
    assert seen == [0, 1, 2, 3, 4, 5]
    for b in batches:
        for group in b.numpy().reshape(3, 4):
            assert len(set(codes[group])) == 1  # K images of one item
            item_size = int((codes == codes[group[0]]).sum())
            assert len(set(group)) == min(4, item_size)  # distinct when the item has enough
    assert [b.tolist() for b in pk_batches(codes, 3, 4, torch.Generator().manual_seed(0))] == [
        b.tolist() for b in batches
    ]


def test_random_batches_drop_the_last_partial() -> None:
    batches = random_batches(10, 4, torch.Generator().manual_seed(1))
    assert [len(b) for b in batches] == [4, 4]
    assert len(set(torch.cat(batches).tolist())) == 8


def test_split_at_refuses_a_body_that_is_not_features_then_pooling() -> None:
    ext = tiny_extractor()
    trunk, top = split_at(ext, 2)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(top(trunk(x)), ext(x), atol=1e-6)

    class Scaled(TinyBody):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.features(x).amax(dim=(2, 3))  # max pooling: not what `top` would do

    odd = Extractor(Scaled(32), ext.spec)
    with pytest.raises(ConfigError, match="cannot be cached"):
        split_at(odd, 1)
    with pytest.raises(ConfigError):
        split_at(ext, 3)  # nothing left to train


def test_unreadable_rows_become_quarantine_rows_of_the_finetune_stage(
    catalog: pd.DataFrame, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = catalog.iloc[:3].copy()
    rows[schema.PATH] = [rows[schema.PATH].iloc[0], str(broken), str(tmp_path / "missing.png")]
    images, ok, failures = load_images(rows, PreprocessConfig(size=SIZE))
    assert ok.tolist() == [True, False, False] and len(images) == 1
    assert failures[schema.IMAGE_ID].tolist() == rows[schema.IMAGE_ID].tolist()[1:]
    assert set(failures[schema.STAGE]) == {"finetune"}
    assert failures[schema.REASON].tolist() == ["corrupt", "missing_file"]


def test_trunk_outputs_are_the_trunk_on_the_loaded_images(catalog: pd.DataFrame) -> None:
    ext = tiny_extractor()
    cfg = PreprocessConfig(size=SIZE)
    rows = catalog.iloc[:10]
    trunk, _ = split_at(ext, 1)
    out, ok, failures = trunk_outputs(rows, cfg, trunk, 4, torch.float32, channels_last=False)
    images, _, _ = load_images(rows, cfg)
    with torch.no_grad():
        expected = trunk(normaliser(cfg)(images))
    assert ok.all() and failures.empty and torch.equal(out, expected)
