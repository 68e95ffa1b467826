"""Fine-tuning on synthetic images: learning, resume, checkpoint safety, config, augmentation.

Items are coloured shapes; the "vendors" draw each item on a different background (and shift it
a pixel), so an untrained network groups images by vendor and fine-tuning must learn to group
them by item - on val items it never trained on.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from imgsearch import schema
from imgsearch.config import PROJECT_ROOT, from_dict, load_config
from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.errors import ConfigError
from imgsearch.models import backbones
from imgsearch.models.backbones import (
    Backbone,
    Built,
    Extractor,
    ExtractorSpec,
    create_extractor,
    features_blocks,
    fingerprint,
    load_extractor,
    save_extractor,
)
from imgsearch.train.augment import (
    AugmentConfig,
    as_augment_config,
    augment_batch,
    blur_kernel,
    eval_transform,
    paper_augment,
    train_transform,
)
from imgsearch.train.finetune import (
    CHECKPOINT_FILE,
    CheckpointError,
    FinetuneConfig,
    finetune,
    load_checkpoint,
    load_images,
    pk_batches,
    random_batches,
    save_checkpoint,
    split_at,
)
from imgsearch.train.validation import val_scores

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


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """24 items (shape x colour) x 4 vendors, 32 px PNGs; every third item is a val item."""
    root = tmp_path_factory.mktemp("shapes")
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


class _TinyBody(nn.Module):
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


@pytest.fixture(autouse=True)
def tiny_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the tiny test backbone, declaring its block layout like every backbone does."""

    def build(imagenet: bool) -> Built:
        return Built(_TinyBody(32), 32, PreprocessConfig(size=SIZE), ())

    monkeypatch.setitem(
        backbones.REGISTRY, "tiny", Backbone(build, features_blocks, pooled_blocks=True)
    )


def tiny_extractor(seed: int = 0, dim: int = 32) -> Extractor:
    torch.manual_seed(seed)
    spec = ExtractorSpec("tiny", "none", dim, PreprocessConfig(size=SIZE))
    return Extractor(_TinyBody(dim), spec).eval()


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


# --- learning -------------------------------------------------------------------------------------


def test_supcon_loss_goes_down_and_val_retrieval_improves(catalog: pd.DataFrame) -> None:
    ext = tiny_extractor()
    before = fingerprint(ext)
    seen: list[int] = []
    result = finetune(ext, catalog, fast_cfg(), on_epoch=lambda e, row: seen.append(e))
    h = result.history
    assert seen == list(range(9)) and h["epoch"].tolist() == list(range(9))
    losses = h["loss"].to_numpy()[1:]
    assert losses[-3:].mean() < 0.75 * losses[0]
    # untrained, the network groups by vendor (background), far below chance; trained, by item
    assert result.metrics["initial_val_map_at_r"] < 0.05
    assert result.metrics["best_val_map_at_r"] > result.metrics["initial_val_map_at_r"] + 0.08
    assert result.metrics["best_epoch"] > 0 and result.stop_reason == "epochs"
    assert result.metrics["n_train_items"] == 16 and result.metrics["n_val_images"] == 32
    for column in ("val_map", "val_recall_at_1", "val_embedding_std", "images_per_s", "lr"):
        assert column in h.columns
    assert (h["val_embedding_std"] > 0).all()
    # the returned extractor is the best epoch's, in eval mode; the input one is untouched
    assert fingerprint(ext) == before
    assert not result.extractor.training
    assert result.extractor.spec.weights == "none+supcon"
    val = catalog[catalog[schema.SPLIT] == "val"]
    images, _, _ = load_images(val, result.extractor.spec.preprocess)
    with torch.no_grad():
        emb = result.extractor(
            eval_transform(SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(images)
        )
    again = val_scores(emb.numpy(), val[schema.ITEM_ID].to_numpy())["map_at_r"]
    assert again == pytest.approx(result.metrics["best_val_map_at_r"], abs=1e-6)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_self_supervised_methods_train(catalog: pd.DataFrame, method: str) -> None:
    cfg = fast_cfg(method=method, epochs=1, head_dims=[32, 16], moco_queue_size=40, temperature=0.2)
    result = finetune(tiny_extractor(), catalog, cfg)
    h = result.history
    assert len(h) == 2 and np.isfinite(h["loss"].to_numpy()[1:]).all()
    assert "val_map_at_r_head" in h.columns and np.isfinite(h["val_map_at_r_head"]).all()
    assert result.metrics["train_images_per_s"] > 0


def test_mobilenet_v2_freeze_blocks_and_resolution(catalog: pd.DataFrame, tmp_path: Path) -> None:
    """A real backbone (random init): frozen blocks do not move, the spec carries the new size."""
    ext = create_extractor("mobilenet_v2", "none")
    small = catalog[catalog[schema.ITEM_ID].isin(["circle-0", "square-1", "ring-2", "bar-0"])]
    cfg = fast_cfg(
        epochs=1, batch_size=8, train_size=40, freeze_blocks=3, freeze_bn=True, channels_last=True
    )
    result = finetune(ext, small.assign(split="train"), cfg)  # no val: the last epoch is kept
    out = result.extractor
    assert out.spec.preprocess.size == 40 and ext.spec.preprocess.size == 224
    before, after = ext.state_dict(), out.state_dict()
    for key in before:
        same = torch.equal(before[key], after[key])
        if (
            key.startswith(("body.features.0.", "body.features.1.", "body.features.2."))
            or "running_" in key
        ):
            assert same, f"{key} should be frozen"
    assert any(
        not torch.equal(before[k], after[k]) for k in before if k.startswith("body.features.18.")
    )
    assert all(p.requires_grad for p in out.parameters())  # the caller gets a normal module back
    save_extractor(out, tmp_path / "ext")
    assert fingerprint(load_extractor(tmp_path / "ext")) == fingerprint(out)


def test_cached_trunk_trains_exactly_like_the_full_forward(catalog: pd.DataFrame) -> None:
    """augment=false: the frozen blocks' outputs are computed once; in float32 the training is
    the same as running the whole network at every step."""
    kw: dict[str, object] = {"augment": False, "freeze_blocks": 1, "epochs": 2, "head_dims": [16]}
    cached = finetune(tiny_extractor(), catalog, fast_cfg(**kw, cache_dtype="float32"))
    full = finetune(tiny_extractor(), catalog, fast_cfg(**kw, cache_frozen=False))
    cols = ["loss", "val_map_at_r", "val_map", "val_map_at_r_head"]
    pd.testing.assert_frame_equal(cached.history[cols], full.history[cols], atol=1e-4, rtol=1e-3)
    a, b = cached.extractor.state_dict(), full.extractor.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)
    assert cached.history["loss"].iloc[-1] < cached.history["loss"].iloc[1]
    half = finetune(tiny_extractor(), catalog, fast_cfg(**kw))  # float16 cache: close, not equal
    assert half.history["val_map_at_r"].iloc[-1] == pytest.approx(
        cached.history["val_map_at_r"].iloc[-1], abs=0.05
    )


def test_split_at_refuses_a_body_that_is_not_features_then_pooling() -> None:
    ext = tiny_extractor()
    trunk, top = split_at(ext, 2)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(top(trunk(x)), ext(x), atol=1e-6)

    class Scaled(_TinyBody):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.features(x).amax(dim=(2, 3))  # max pooling: not what `top` would do

    odd = Extractor(Scaled(32), ext.spec)
    with pytest.raises(ConfigError, match="cannot be cached"):
        split_at(odd, 1)
    with pytest.raises(ConfigError):
        split_at(ext, 3)  # nothing left to train


def test_freeze_blocks_per_backbone_and_uncachable_bodies_train_uncached(
    catalog: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    """freeze_blocks may map backbone names to k (``default`` for the rest); a body whose frozen
    blocks cannot be split off still trains, without the cache."""
    cfg = fast_cfg(freeze_blocks={"tiny": 1, "default": 0})
    assert cfg.blocks_to_freeze("tiny") == 1 and cfg.blocks_to_freeze("resnet50") == 0
    assert fast_cfg(freeze_blocks={"x": 2}).blocks_to_freeze("tiny") == 0
    assert fast_cfg(freeze_blocks=2).blocks_to_freeze("anything") == 2
    for bad in ({"tiny": -1}, {"tiny": "two"}, {"tiny": True}, -1):
        with pytest.raises(ConfigError, match="freeze_blocks"):
            fast_cfg(freeze_blocks=bad)

    class MaxPooled(_TinyBody):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.features(x).amax(dim=(2, 3))

    torch.manual_seed(0)
    odd = Extractor(MaxPooled(32), ExtractorSpec("tiny", "none", 32, PreprocessConfig(size=SIZE)))
    kw: dict[str, object] = {"augment": False, "epochs": 2, "head_dims": [16]}
    with caplog.at_level(logging.WARNING, logger="imgsearch.train.finetune"):
        result = finetune(odd, catalog, fast_cfg(**kw, freeze_blocks={"tiny": 1}))
    assert "not cached" in caplog.text
    first = dict(odd.body.features[0].named_parameters())
    after = dict(result.extractor.body.features[0].named_parameters())
    assert all(torch.equal(first[k], after[k]) for k in first)  # frozen all the same
    assert result.history["loss"].iloc[-1] < result.history["loss"].iloc[1]


def test_a_collapsed_epoch_is_never_kept(
    catalog: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Identical embeddings rank by chance; a lucky MAP@R on them must not pick the epoch."""
    import imgsearch.train.loop as loop

    real, calls = loop.embed, []

    def collapsing(*args: object, **kw: object) -> tuple[np.ndarray, np.ndarray]:
        emb, head = real(*args, **kw)  # type: ignore[arg-type]
        calls.append(1)
        if len(calls) == 1:
            return emb, head
        return np.ones_like(emb), np.ones_like(head)

    monkeypatch.setattr(loop, "embed", collapsing)
    result = finetune(tiny_extractor(), catalog, fast_cfg(epochs=2, patience=0))
    assert (result.history["val_embedding_std"].iloc[1:] < 1e-6).all()
    assert result.metrics["best_epoch"] == 0


def test_keep_head(catalog: pd.DataFrame, tmp_path: Path) -> None:
    """With keep_head the returned extractor embeds through the trained head (recorded in
    ExtractorSpec.head), early stopping watches that embedding, and it survives save/load."""
    cfg = fast_cfg(epochs=3, head_dims=[24, 16], keep_head=True)
    result = finetune(tiny_extractor(), catalog, cfg)
    h = result.history
    assert h["val_map_at_r"].iloc[0] == h["val_map_at_r_backbone"].iloc[0]  # epoch 0: no head yet
    assert (h["val_map_at_r"].iloc[1:] == h["val_map_at_r_head"].iloc[1:]).all()
    out = result.extractor
    if result.metrics["best_epoch"] > 0:
        assert out.spec.head == (24, 16) and out.spec.embedding_dim == 16
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        emb = out(x)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    mobile = create_extractor("mobilenet_v2", "none")
    small = catalog[catalog[schema.ITEM_ID].isin(["circle-0", "square-1", "ring-2"])]
    kept = finetune(
        mobile,
        small.assign(split="train"),
        fast_cfg(
            epochs=1,
            batch_size=8,
            train_size=32,
            head_dims=[8],
            keep_head=True,
            freeze_blocks=17,
            augment=False,
        ),
    ).extractor
    assert kept.spec.head == (8,) and kept.spec.embedding_dim == 8
    save_extractor(kept, tmp_path / "kept")
    again = load_extractor(tmp_path / "kept")
    assert fingerprint(again) == fingerprint(kept)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again(x), kept(x), atol=1e-6)
    # Warm start from an extractor with a head (the incremental job starts from such a champion):
    # its head is the projection head trained on (head_dims ignored), not a second head on top.
    cont = finetune(
        again,
        small.assign(split="train"),
        fast_cfg(
            epochs=1,
            lr=1e-12,
            batch_size=8,
            head_dims=[99],
            keep_head=True,
            freeze_blocks=17,
            augment=False,
        ),
    ).extractor
    assert cont.spec.head == (8,) and cont.spec.preprocess.size == 32
    with torch.no_grad():
        assert torch.allclose(cont(x), again(x), atol=1e-2)  # BN statistics may move a little


def test_without_val_split_the_last_epoch_is_kept(catalog: pd.DataFrame) -> None:
    train_only = catalog[catalog[schema.SPLIT] == "train"]
    result = finetune(tiny_extractor(), train_only, fast_cfg(epochs=2))
    assert result.metrics["best_epoch"] == 2 and math.isnan(result.metrics["best_val_map_at_r"])


def test_time_budget_stops_before_an_epoch(catalog: pd.DataFrame) -> None:
    result = finetune(tiny_extractor(), catalog, fast_cfg(epochs=50, max_minutes=1e-6))
    assert result.stop_reason == "time_budget" and result.metrics["epochs_run"] == 0
    assert result.metrics["time_budget_hit"] == 1.0


def test_early_stopping(catalog: pd.DataFrame) -> None:
    # lr so small nothing improves beyond min_delta: stops after `patience` epochs
    result = finetune(
        tiny_extractor(), catalog, fast_cfg(epochs=10, lr=1e-9, patience=2, min_delta=0.5)
    )
    assert result.stop_reason == "early_stopping"
    assert result.metrics["epochs_run"] == 2 and result.metrics["best_epoch"] == 0


def test_unreadable_image_is_reported_not_fatal(catalog: pd.DataFrame, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = catalog.iloc[:1].assign(
        **{schema.IMAGE_ID: "bad/1", schema.PATH: str(broken), schema.SPLIT: "train"}
    )
    result = finetune(
        tiny_extractor(), pd.concat([catalog, bad], ignore_index=True), fast_cfg(epochs=1)
    )
    assert result.metrics["n_unreadable"] == 1
    assert result.failures[schema.IMAGE_ID].tolist() == ["bad/1"]
    assert result.failures[schema.STAGE].tolist() == ["finetune"]


def test_bad_inputs_raise(catalog: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match="split"):
        finetune(tiny_extractor(), catalog.drop(columns=[schema.SPLIT]), fast_cfg())
    one_item = catalog[catalog[schema.ITEM_ID] == "circle-0"]
    with pytest.raises(ConfigError, match="at least 2 train items"):
        finetune(tiny_extractor(), one_item, fast_cfg())


# --- images and batches -----------------------------------------------------------------------------


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


# --- checkpoints and resume -----------------------------------------------------------------------------


class _Killed(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["supcon", "moco"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(
    catalog: pd.DataFrame, tmp_path: Path, method: str
) -> None:
    cfg_kw = {
        "method": method,
        "epochs": 2,
        "head_dims": [16],
        "moco_queue_size": 40,
        "warmup_epochs": 1.0,
    }
    straight = finetune(
        tiny_extractor(), catalog, fast_cfg(**cfg_kw, checkpoint_dir=str(tmp_path / "a"))
    )

    def kill_after_first(epoch: int, row: dict[str, float]) -> None:
        if epoch == 1:
            raise _Killed

    ckpt = tmp_path / "b"
    with pytest.raises(_Killed):
        finetune(
            tiny_extractor(),
            catalog,
            fast_cfg(**cfg_kw, checkpoint_dir=str(ckpt)),
            on_epoch=kill_after_first,
        )
    assert load_checkpoint(ckpt / CHECKPOINT_FILE)["epoch"] == 1
    resumed_epochs: list[int] = []
    resumed = finetune(
        tiny_extractor(),
        catalog,
        fast_cfg(**cfg_kw, checkpoint_dir=str(ckpt)),
        on_epoch=lambda e, row: resumed_epochs.append(e),
    )
    assert resumed_epochs == [2]
    cols = ["epoch", "loss", "val_map_at_r", "val_map", "lr"]
    pd.testing.assert_frame_equal(
        straight.history[cols], resumed.history[cols], atol=1e-5, rtol=1e-4
    )
    a, b = straight.extractor.state_dict(), resumed.extractor.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)
    # a finished run is not trained again: its result comes back from the checkpoint
    again = finetune(tiny_extractor(), catalog, fast_cfg(**cfg_kw, checkpoint_dir=str(ckpt)))
    assert len(again.history) == len(resumed.history)
    assert fingerprint(again.extractor) == fingerprint(resumed.extractor)


def test_resume_refuses_another_config_or_extractor(catalog: pd.DataFrame, tmp_path: Path) -> None:
    finetune(tiny_extractor(), catalog, fast_cfg(epochs=1, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="lr"):
        finetune(
            tiny_extractor(), catalog, fast_cfg(epochs=1, lr=1e-2, checkpoint_dir=str(tmp_path))
        )
    with pytest.raises(CheckpointError, match="another starting extractor"):
        finetune(tiny_extractor(seed=5), catalog, fast_cfg(epochs=1, checkpoint_dir=str(tmp_path)))


class _Evil:
    """Unpickling this runs code: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused(catalog: pd.DataFrame, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    torch.save({"format": 1, "model": _Evil(marker)}, ckpt_dir / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(ckpt_dir / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError):
        finetune(tiny_extractor(), catalog, fast_cfg(epochs=1, checkpoint_dir=str(ckpt_dir)))
    (ckpt_dir / "plain.pkl").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt_dir / "plain.pkl")
    assert not marker.exists()


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint({"format": 1, "epoch": 1, "w": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[()]]:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"format": 1, "epoch": 2, "w": Boom()}, path)
    assert load_checkpoint(path)["epoch"] == 1  # the previous checkpoint survives
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temporary left behind
    torch.save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an imgsearch"):
        load_checkpoint(tmp_path / "other.pt")


# --- config -----------------------------------------------------------------------------------------


def test_config_file_matches_the_dataclass() -> None:
    cfg = load_config(directory=PROJECT_ROOT / "configs")
    built = from_dict(FinetuneConfig, cfg["finetune"])
    assert built.method in ("supcon", "simclr", "moco")


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "byol"},
        {"optimizer": "adam"},
        {"temperature": 0.0},
        {"lr": -1.0},
        {"epochs": 0},
        {"batch_size": 4, "images_per_item": 4},
        {"moco_momentum": 1.0},
        {"head_dims": [0]},
        {"train_size": 4},
        {"max_minutes": 0},
        {"augment": {"crop_scale": [0.0, 1.0]}},
        {"augment": {"no_such_key": 1}},
        {"augment": False, "method": "simclr"},
        {"cache_dtype": "int8"},
        {"unknown_key": 1},
    ],
)
def test_bad_config_raises(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        from_dict(FinetuneConfig, bad)


# --- augmentation -----------------------------------------------------------------------------------


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
