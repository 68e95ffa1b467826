"""What a fine-tuning run returns: the best extractor, the history and the summary metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd

from imgsearch import schema
from imgsearch.models.backbones import Extractor
from imgsearch.train.inputs import TrainInputs


@dataclass
class FinetuneResult:
    """``extractor``: the best epoch's (eval mode, spec with the training resolution; with the
    trained projection head when ``keep_head``). ``history``: one row per epoch (0 = before
    training). ``metrics``: the summary (``best_epoch``, ``best_val_map_at_r``,
    ``initial_val_map_at_r``, ...). ``failures``: quarantine rows of unreadable images."""

    extractor: Extractor
    history: pd.DataFrame
    metrics: dict[str, float]
    stop_reason: str = ""
    failures: pd.DataFrame = field(default_factory=schema.empty_quarantine)


def summary(
    history: pd.DataFrame,
    best_epoch: int,
    stop_reason: str,
    inputs: TrainInputs,
    train_size: int,
    wall_start: float,
) -> dict[str, float]:
    """The run's metrics from its ``history`` (one row per epoch, 0 = before training)."""
    trained = history[history["epoch"] > 0]
    initial = history.loc[history["epoch"] == 0, "val_map_at_r"]
    best = history.loc[history["epoch"] == best_epoch]

    def best_value(column: str) -> float:
        return float(best[column].iloc[0]) if len(best) else float("nan")

    return {
        "best_epoch": float(best_epoch),
        "best_val_map_at_r": best_value("val_map_at_r"),
        "best_val_map": best_value("val_map"),
        "best_val_recall_at_1": best_value("val_recall_at_1"),
        "initial_val_map_at_r": float(initial.iloc[0]) if len(initial) else float("nan"),
        "epochs_run": float(len(trained)),
        "early_stopped": float(stop_reason == "early_stopping"),
        "time_budget_hit": float(stop_reason == "time_budget"),
        "train_images_per_s": float(trained["images_per_s"].mean())
        if len(trained)
        else float("nan"),
        "wall_seconds": time.perf_counter() - wall_start,
        "n_train_images": float(len(inputs.train_x)),
        "n_train_items": float(inputs.n_items),
        "n_val_images": float(len(inputs.val_x)),
        "n_unreadable": float(len(inputs.failures)),
        "n_from_trunk": float(inputs.n_from_trunk),
        "train_bf16": float(inputs.bf16),
        "train_size": float(train_size),
    }
