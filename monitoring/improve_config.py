"""The improve job's settings (:class:`ImproveConfig`, ``configs/improve.yaml``) and the small
things its steps share: the role tag of its runs (``ROLE``), the drift figures it keeps,
:class:`Stopped`, the pause test hook, its nested runs and the headline metrics of a run.

:mod:`monitoring.improve` is the entry (``run``) and its docstring describes the flow;
:mod:`monitoring.improve_job` is the flow up to the decision (:class:`~monitoring.improve_job.Job`);
:mod:`monitoring.improve_challenger` holds the ways to a challenger once the new data is in.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from imgsearch.config import home_dir
from imgsearch.data.watermark import ON_NOVEL
from imgsearch.errors import ConfigError
from steps.common import HEADLINE
from steps.runs import start_labelled_run

log = logging.getLogger(__name__)

ROLE = "improve"  # the imgsearch.role tag of the job's runs
PAUSE_ENV = "IMGSEARCH_IMPROVE_PAUSE_AT"
PAUSE_FILE_ENV = "IMGSEARCH_IMPROVE_PAUSE_FILE"
#: the drift run's figures the job keeps (metrics of its parent run, summary.json)
DRIFT_METRICS = (
    "drift_score",
    "drift_threshold",
    "drift_detected",
    "drift_effect",
    "knn_novel_share",
    "knn_distance_ratio",
)


@dataclass
class ImproveConfig:
    """``configs/improve.yaml``; see the comments there."""

    min_new_images: int = 500
    max_new_per_run: int | None = None
    finetune: bool = True
    replay_fraction: float = 1.0
    replay_max: int | None = 5000
    replay_same_items: bool = True
    keep_champion_size: bool = True
    finetune_overrides: dict[str, Any] = field(default_factory=dict)
    extend_index_on_wait: bool = True
    fallback_extend_on_refusal: bool = True
    on_novel: str = "review"
    release_held: bool = False
    refit_attributes: bool = True
    watermark_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_new_images < 1:
            raise ConfigError("improve.min_new_images must be >= 1")
        if self.max_new_per_run is not None and self.max_new_per_run < 1:
            raise ConfigError("improve.max_new_per_run must be >= 1 or null")
        if not (self.replay_fraction >= 0 and math.isfinite(self.replay_fraction)):
            raise ConfigError("improve.replay_fraction must be a finite number >= 0")
        if self.on_novel not in ON_NOVEL:
            raise ConfigError(f"improve.on_novel must be one of {ON_NOVEL}, not {self.on_novel!r}")
        if not isinstance(self.finetune_overrides, Mapping):
            raise ConfigError("improve.finetune_overrides must be a mapping of finetune settings")

    @property
    def watermarks(self) -> Path:
        return Path(self.watermark_dir) if self.watermark_dir else home_dir() / "watermarks"


class Stopped(Exception):
    """The daemon asked to stop: the job returns before its next step."""


def _pause_point(step: str) -> None:
    """Test hook (:mod:`monitoring.improve` docstring): sleep before ``step`` so a test can kill the job there."""
    if os.environ.get(PAUSE_ENV) != step:
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        Path(marker).write_text(f"{os.getpid()} {step}\n")
    log.warning("%s=%s: pausing 600 s before %s", PAUSE_ENV, step, step)
    time.sleep(600)


def _nested(name: str, stage: str | None = None) -> Any:
    """A nested run of the job's own (``newdata · improve``, tagged ``imgsearch.role=improve``)."""
    return start_labelled_run(stage or name, name=name)


def _metrics_of(run_id: str | None, prefix: str = "") -> dict[str, float]:
    if not run_id:
        return {}
    metrics = mlflow.get_run(run_id).data.metrics
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if k in HEADLINE}
