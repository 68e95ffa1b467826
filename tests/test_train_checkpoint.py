"""Fine-tuning checkpoints: atomic writes, weights-only reads, resume checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imgsearch.errors import ConfigError
from imgsearch.train.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from imgsearch.train.config import FinetuneConfig


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


def test_resume_checks_ignore_only_the_resumable_fields(tmp_path: Path) -> None:
    cfg = FinetuneConfig(epochs=2)
    state = {"config": cfg.to_dict(), "start_fingerprint": "abc"}
    resumed = FinetuneConfig(epochs=2, checkpoint_dir=str(tmp_path), max_minutes=5)
    check_resumable(state, resumed, "abc", tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ConfigError, match=r"differs in \['epochs'\]"):
        check_resumable(state, FinetuneConfig(epochs=3), "abc", tmp_path)
    with pytest.raises(CheckpointError, match="another starting extractor"):
        check_resumable(state, cfg, "other", tmp_path)
