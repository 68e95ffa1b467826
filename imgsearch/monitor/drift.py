"""Embedding drift: a fast verdict, an A/A-calibrated threshold, and what moved.

The four methods are Evidently's embedding-drift methods (``evidently.metrics.embeddings``, 0.7),
re-implemented on numpy arrays so the verdict costs only the method itself (Evidently's report also
fits a t-SNE of up to 2 x 2,500 points for its plot, ~97% of its time):

- ``mmd``: unbiased squared maximum mean discrepancy (Gretton et al. 2012) with an RBF kernel,
  bandwidth by the median heuristic on reference-vs-current distances; drift when MMD^2_u > threshold.
- ``model``: ROC AUC of a logistic SGD domain classifier (reference vs current) on a 50% hold-out.
- ``ratio``: share of dimensions whose normed Wasserstein distance is >= ``component_threshold``.
- ``distance``: distance between the two mean embeddings.

Scores and verdicts equal Evidently's for the same data and parameters (same seeds, same sampling;
tests/test_drift.py checks it), except that MMD is computed block-wise so a 10k x 10k kernel
matrix is never held in memory.

A fixed threshold is a guess. :func:`calibrate` measures the score's distribution when nothing
changed (A/A: disjoint reference subsamples of the production sizes) and picks the threshold whose
false-alarm rate is at most the configured level (RELIABILITY 15). Note on Evidently's own MMD
bootstrap: its default ``quantile_probability`` is 0.05, i.e. drift is flagged when MMD exceeds the
*5th* percentile of its bootstrap null, which raises an alarm on most A/A splits; do not use it as is.

:func:`explain_shift` says which K-means clusters of the reference grew or shrank;
:func:`metadata_shift` compares category / NSFW / format shares of two manifests.

Where things live: the statistics and the verdict in :mod:`imgsearch.monitor.scores`, the A/A
calibration in :mod:`imgsearch.monitor.calibration`, the explanations in
:mod:`imgsearch.monitor.shift`; this module holds the config and :func:`analyse`, and re-exports
the public names of the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from imgsearch.errors import ConfigError
from imgsearch.monitor.calibration import (
    Calibration,
    aa_sizes,
    calibrate,
    conformal_threshold,
)
from imgsearch.monitor.scores import (
    DISTANCES,
    EVIDENTLY_THRESHOLDS,
    METHODS,
    DriftResult,
    _check_method,
    drift_score,
    drift_verdict,
    median_gamma,
    mmd2u,
)
from imgsearch.monitor.shift import explain_shift, metadata_shift

__all__ = [
    "DISTANCES",
    "EVIDENTLY_THRESHOLDS",
    "METHODS",
    "Calibration",
    "DriftAnalysis",
    "DriftConfig",
    "DriftResult",
    "aa_sizes",
    "analyse",
    "calibrate",
    "conformal_threshold",
    "drift_score",
    "drift_verdict",
    "explain_shift",
    "median_gamma",
    "metadata_shift",
    "mmd2u",
]


@dataclass
class DriftConfig:
    """Drift settings (``configs/drift.yaml``).

    ``threshold``: fixed threshold; ``None`` = calibrated when ``calibrate`` else Evidently's default.
    ``false_alarm_rate``: the A/A false-alarm level the calibrated threshold keeps to.
    ``calibration_trials``: A/A splits drawn; ``window``: current-window size used in calibration
    (``None`` = the size of the current data); ``max_reference``: cap on the pseudo-reference of
    an A/A split (speed; a smaller reference widens the null, so the threshold errs high). ``clusters``: K of :func:`explain_shift`.
    ``report``: Evidently HTML report ``"sample"`` (``report_sample`` rows each side), ``"full"``
    or ``"none"``.
    """

    method: str = "mmd"
    threshold: float | None = None
    calibrate: bool = True
    false_alarm_rate: float = 0.05
    calibration_trials: int = 100
    window: int | None = None
    max_reference: int | None = 2000
    pca_components: int | None = None
    distance: str = "euclidean"
    component_threshold: float = 0.1
    clusters: int = 8
    seed: int = 0
    report: str = "sample"
    report_sample: int = 1000

    def __post_init__(self) -> None:
        _check_method(self.method)
        if self.distance not in DISTANCES:
            raise ConfigError(f"distance must be one of {DISTANCES}, not {self.distance!r}")
        if not 0.0 < self.false_alarm_rate < 1.0:
            raise ConfigError(f"false_alarm_rate must be in (0, 1), not {self.false_alarm_rate}")
        if self.calibration_trials < 1:
            raise ConfigError("calibration_trials must be >= 1")
        if self.report not in ("sample", "full", "none"):
            raise ConfigError(f"report must be sample | full | none, not {self.report!r}")

    def method_params(self) -> dict[str, Any]:
        return {
            "pca_components": self.pca_components,
            "distance": self.distance,
            "component_threshold": self.component_threshold,
        }


@dataclass
class DriftAnalysis:
    result: DriftResult
    calibration: Calibration | None
    clusters: pd.DataFrame
    metrics: dict[str, float]


def analyse(
    reference: np.ndarray,
    current: np.ndarray,
    cfg: DriftConfig,
    reference_ids: np.ndarray | None = None,
) -> DriftAnalysis:
    """Calibrate (unless a threshold is fixed), decide, and explain: the drift stage in one call."""
    params = cfg.method_params()
    calibration = None
    threshold = cfg.threshold
    if threshold is None and cfg.calibrate:
        calibration = calibrate(
            reference,
            cfg.window or int(np.shape(current)[0]),
            cfg.method,
            cfg.false_alarm_rate,
            cfg.calibration_trials,
            cfg.seed,
            max_reference=cfg.max_reference,
            **params,
        )
        threshold = calibration.threshold
    result = drift_verdict(reference, current, cfg.method, threshold, **params)
    clusters = explain_shift(reference, current, cfg.clusters, cfg.seed, reference_ids)
    metrics = result.metrics()
    if calibration is not None:
        metrics.update(calibration.metrics())
    grown = clusters[clusters["cluster"] >= 0]
    metrics["cluster_max_abs_delta"] = float(grown["delta"].abs().max()) if len(grown) else 0.0
    metrics["novel_share"] = float(clusters.loc[clusters["cluster"] == -1, "cur_share"].iloc[0])
    return DriftAnalysis(result, calibration, clusters, metrics)
