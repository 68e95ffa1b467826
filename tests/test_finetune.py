"""Fine-tuning end to end on synthetic images (:mod:`tests.train_data`): learning, methods,
freezing and the frozen-trunk cache, the kept head, early stopping, resume, checkpoint safety.

The parts have their own tests: ``test_train_config``, ``test_train_inputs``,
``test_train_checkpoint``, ``test_train_loop`` (early stopping, objectives), ``test_train_augment``,
``test_train_validation`` and ``test_backbone_blocks``.
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

from imgsearch import schema
from imgsearch.data.preprocess import PreprocessConfig
from imgsearch.errors import ConfigError
from imgsearch.models.backbones import (
    Extractor,
    ExtractorSpec,
    create_extractor,
    fingerprint,
    load_extractor,
    save_extractor,
)
from imgsearch.train import inputs as train_inputs
from imgsearch.train import precision
from imgsearch.train.augment import eval_transform
from imgsearch.train.finetune import (
    CHECKPOINT_FILE,
    CheckpointError,
    finetune,
    load_checkpoint,
    load_images,
)
from imgsearch.train.inputs import attribute_codes
from imgsearch.train.precision import train_autocast
from imgsearch.train.validation import val_scores
from tests.train_data import (
    SIZE,
    TinyBody,
    fast_cfg,
    register_tiny,
    shapes_catalog,
    tiny_extractor,
)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return shapes_catalog(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(autouse=True)
def tiny_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny(monkeypatch)


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


def test_bfloat16_steps_train_like_float32_and_fall_back_where_the_cpu_lacks_it(
    catalog: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train_dtype bfloat16: the training steps' convolutions compute in bfloat16 (seen by a
    hook), the loss still falls, validation and the returned weights stay float32; without
    native bfloat16 the run is the float32 one, exactly, and the reason says why."""
    kw: dict[str, object] = {"augment": False, "freeze_blocks": 1, "epochs": 3, "head_dims": [16]}
    fp32 = finetune(tiny_extractor(), catalog, fast_cfg(**kw))
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert train_autocast("bfloat16") == (
        False,
        "bfloat16 asked, but this CPU has no native bfloat16 (float32 runs)",
    )
    fallback = finetune(tiny_extractor(), catalog, fast_cfg(**kw, train_dtype="bfloat16"))
    pd.testing.assert_frame_equal(
        fallback.history[["loss", "val_map_at_r"]], fp32.history[["loss", "val_map_at_r"]]
    )
    assert fallback.metrics["train_bf16"] == 0.0

    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    seen: set[torch.dtype] = set()
    original = train_inputs.TrainInputs.encode

    def spying_encode(self: train_inputs.TrainInputs, idx: torch.Tensor) -> torch.Tensor:
        assert self.top is not None
        conv = next(m for m in self.top.modules() if isinstance(m, torch.nn.Conv2d))
        hook = conv.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
        try:
            out = original(self, idx)
        finally:
            hook.remove()
        assert out.dtype == torch.float32
        return out

    monkeypatch.setattr(train_inputs.TrainInputs, "encode", spying_encode)
    bf16 = finetune(tiny_extractor(), catalog, fast_cfg(**kw, train_dtype="bfloat16"))
    assert seen == {torch.bfloat16} and bf16.metrics["train_bf16"] == 1.0
    losses = bf16.history["loss"].to_numpy()[1:]
    assert losses[-1] < losses[0]
    assert not np.allclose(losses, fp32.history["loss"].to_numpy()[1:], rtol=0, atol=1e-7)
    assert np.allclose(losses, fp32.history["loss"].to_numpy()[1:], rtol=0.05)
    assert all(
        v.dtype == torch.float32
        for v in bf16.extractor.state_dict().values()
        if v.is_floating_point()
    )
    with pytest.raises(ConfigError, match="train_dtype"):
        fast_cfg(train_dtype="float16")


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

    class MaxPooled(TinyBody):
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


def test_attribute_codes_factorise_the_train_rows_and_mark_missing_values() -> None:
    rows = pd.DataFrame({"category": ["b", "a", None, "b"], "one": ["x"] * 4})
    codes = attribute_codes(rows, ["category"])["category"]
    assert codes.tolist() == [0, 1, -1, 0]
    with pytest.raises(ConfigError, match="fewer than 2 classes"):
        attribute_codes(rows, ["one"])
    with pytest.raises(ConfigError, match="does not have"):
        attribute_codes(rows, ["subcategory"])


def test_multi_task_fine_tuning_trains_and_resumes_its_classifiers(
    catalog: pd.DataFrame, tmp_path: Path
) -> None:
    """SupCon plus a cross-entropy term on each item's shape (whether it helps is measured on the
    demo catalog: benchmarks/README.md); here: it trains, and a checkpoint keeps the classifiers."""
    shaped = catalog.assign(shape=catalog[schema.ITEM_ID].str.split("-").str[0])
    cfg = fast_cfg(epochs=3, attribute_loss={"shape": 1.0}, checkpoint_dir=str(tmp_path))
    result = finetune(tiny_extractor(), shaped, cfg)
    losses = result.history["loss"].to_numpy()[1:]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert set(state["attribute_classifiers"]) == {"weights.shape"}
    assert tuple(state["attribute_classifiers"]["weights.shape"].shape) == (6, 32)
    with pytest.raises(ConfigError, match="does not have"):
        finetune(tiny_extractor(), catalog, fast_cfg(attribute_loss={"shape": 1.0}))


# --- checkpoints and resume -----------------------------------------------------------------------


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
