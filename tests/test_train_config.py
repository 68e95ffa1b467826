"""Fine-tuning settings: the flat FinetuneConfig users write, and its per-component configs."""

from __future__ import annotations

import dataclasses

import pytest

from imgsearch.config import PROJECT_ROOT, from_dict, load_config
from imgsearch.errors import ConfigError
from imgsearch.train.config import FinetuneConfig, FreezeConfig, ObjectiveConfig, OptimConfig


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


#: The names users write in configs/finetune.yaml, --finetune.* overrides and checkpoints.
FLAT_NAMES = [
    "method", "epochs", "batch_size", "lr", "weight_decay", "optimizer", "warmup_epochs",
    "temperature", "head_dims", "keep_head", "freeze_blocks", "freeze_bn", "train_size",
    "patience", "min_delta", "min_embedding_std", "val_max_queries", "moco_queue_size",
    "moco_momentum", "images_per_item", "augment", "cache_frozen", "cache_dtype", "seed",
    "checkpoint_dir", "max_minutes", "eval_batch_size", "channels_last",
]  # fmt: skip


def test_the_flat_names_and_their_plain_values_do_not_change() -> None:
    cfg = FinetuneConfig(lr=1, head_dims=[8, 4], augment=True, freeze_blocks={"x": 2})
    out = cfg.to_dict()
    assert list(out) == FLAT_NAMES
    assert out["lr"] == 1.0 and isinstance(out["lr"], float) and out["head_dims"] == [8, 4]
    assert out["augment"]["crop_scale"] == [0.2, 1.0]  # the supcon preset, as plain values
    assert FinetuneConfig(**{**out, "augment": None}).to_dict() == out
    assert FinetuneConfig(augment=False).to_dict()["augment"] is False
    multi = FinetuneConfig(attribute_loss={"category": 1}).to_dict()  # listed only when set
    assert multi["attribute_loss"] == {"category": 1.0}
    assert FinetuneConfig(**multi).to_dict() == multi


def test_components_are_slices_of_the_flat_config() -> None:
    cfg = FinetuneConfig(method="moco", temperature=0.2, lr=1e-3, epochs=3, patience=1, seed=4)
    assert (cfg.objective.method, cfg.objective.temperature) == ("moco", 0.2)
    assert (cfg.optim.optimizer, cfg.optim.lr) == ("adamw", 1e-3)
    assert (cfg.schedule.epochs, cfg.stopping.patience, cfg.inputs.eval_batch_size) == (3, 1, 128)
    assert cfg.head.head_dims == (512, 128) and not cfg.head.kept
    assert FinetuneConfig(keep_head=True).head.kept
    assert not FinetuneConfig(keep_head=True, head_dims=[]).head.kept  # nothing to keep
    cfg.checkpoint_dir = "/tmp/x"  # the step sets it after construction
    cfg.max_minutes = 2
    assert cfg.schedule.max_minutes == 2
    replaced = dataclasses.replace(cfg, head_dims=(16,))
    assert replaced.head.head_dims == (16,) and replaced.checkpoint_dir == "/tmp/x"


def test_a_component_validates_on_its_own() -> None:
    with pytest.raises(ConfigError, match="moco_momentum"):
        ObjectiveConfig(moco_momentum=1.5)
    with pytest.raises(ConfigError, match="supcon needs at least 2 items"):
        ObjectiveConfig(batch_size=4, images_per_item=4)
    with pytest.raises(ConfigError, match="lr"):
        OptimConfig(lr=float("inf"))
    with pytest.raises(ConfigError, match="freeze_blocks"):
        FreezeConfig(freeze_blocks={"x": -1})
    assert FreezeConfig(freeze_blocks={"default": 3}).blocks_to_freeze("any") == 3
