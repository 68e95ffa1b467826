"""Fine-tuning checkpoints: written atomically, read weights-only, checked before resuming.

A checkpoint (``last.pt`` in ``checkpoint_dir``) is a dict of plain tensors and containers:
``format``, ``config`` (:meth:`FinetuneConfig.to_dict`), ``start_fingerprint``, ``epoch``,
``model``, ``head``, ``optimizer``, ``scheduler``, ``rng`` (``torch``, ``sampler``), ``best``
(``epoch``, ``metric``, ``state``, ``head``), ``bad_epochs``, ``history``, ``elapsed_s``,
``stop_reason``, plus what the objective keeps (MoCo: ``moco``, ``key_model``, ``key_head``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgsearch.errors import ConfigError, ImgsearchError
from imgsearch.paths import atomic_writer
from imgsearch.train.config import FinetuneConfig

CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = 1
#: Config fields that may change between a run and its resumption.
RESUMABLE_FIELDS = ("checkpoint_dir", "max_minutes")


class CheckpointError(ImgsearchError):
    """A fine-tuning checkpoint cannot be used (not plain tensors/containers, or not ours)."""


def checkpoint_path(cfg: FinetuneConfig) -> Path | None:
    """Where ``cfg``'s run keeps its checkpoint; ``None`` without a ``checkpoint_dir``."""
    return Path(cfg.checkpoint_dir) / CHECKPOINT_FILE if cfg.checkpoint_dir else None


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` into a temporary file beside ``path``, fsync, then ``os.replace``: a crash
    leaves the previous checkpoint or the new one, never half a file."""
    with atomic_writer(path) as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``: tensors and plain containers only.

    Raises :class:`CheckpointError` for anything else (a pickle that would run code on load, a
    truncated file, a file that is not one of our checkpoints).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # UnpicklingError for a forbidden global, RuntimeError for a bad zip
        raise CheckpointError(
            f"refusing checkpoint {path}: not loadable with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an imgsearch fine-tuning checkpoint (format {CHECKPOINT_FORMAT})"
        )
    return state


def check_resumable(state: dict[str, Any], cfg: FinetuneConfig, start_fp: str, path: Path) -> None:
    """Refuse a checkpoint made with another config (:class:`ConfigError`) or from another
    starting extractor (:class:`CheckpointError`); ``RESUMABLE_FIELDS`` may differ."""
    saved, now = dict(state["config"]), cfg.to_dict()
    for name in RESUMABLE_FIELDS:
        saved.pop(name, None)
        now.pop(name, None)
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        raise ConfigError(
            f"checkpoint {path} was made with another config (differs in {differ}); "
            "use another checkpoint_dir or remove the checkpoint to start over"
        )
    if state["start_fingerprint"] != start_fp:
        raise CheckpointError(f"checkpoint {path} was made from another starting extractor")


def plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict (what a checkpoint and the best epoch keep)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
