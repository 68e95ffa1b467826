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

Beside the yes/no, :func:`analyse` reports how large and what kind of a change it is:

- ``drift_effect``: the score over the calibrated threshold (``> 1`` means drift; 300 means the
  score is 300 times what A/A splits reach at the false-alarm rate);
- ``knn_novel_share`` / ``knn_distance_ratio`` (:func:`imgsearch.monitor.novelty.nn_novelty`): the
  share of new images whose nearest reference image is farther than 99% of the reference's own
  nearest-neighbour distances, and how much farther the new images are in the median;
- ``kind`` (:func:`imgsearch.monitor.novelty.drift_kind`): ``none`` (no drift), ``shift`` (drift,
  but the new images fall near things the reference knows: a new style, a new mix) or ``novel``
  (a new domain: more than ``novel_share_max`` of the new images are far from all of it).

:func:`explain_shift` says which K-means clusters of the reference grew or shrank (and, as
``centroid_novel_share``, the share of new images far from every centroid);
:func:`metadata_shift` compares category / NSFW / format shares of two manifests.

Where things live: the statistics and the verdict in :mod:`imgsearch.monitor.scores`, the A/A
calibration in :mod:`imgsearch.monitor.calibration`, the explanations in
:mod:`imgsearch.monitor.shift`, the nearest-neighbour novelty in :mod:`imgsearch.monitor.novelty`;
this module holds the config and :func:`analyse`, and re-exports the public names of the others.
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
from imgsearch.monitor.novelty import KINDS, Novelty, drift_kind, nn_novelty
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
    "KINDS",
    "METHODS",
    "Calibration",
    "DriftAnalysis",
    "DriftConfig",
    "DriftResult",
    "Novelty",
    "aa_sizes",
    "analyse",
    "calibrate",
    "conformal_threshold",
    "drift_kind",
    "drift_score",
    "drift_verdict",
    "explain_shift",
    "median_gamma",
    "metadata_shift",
    "mmd2u",
    "nn_novelty",
]


@dataclass
class DriftConfig:
    """Drift settings (``configs/drift.yaml``).

    ``threshold``: fixed threshold; ``None`` = calibrated when ``calibrate`` else Evidently's default.
    ``false_alarm_rate``: the A/A false-alarm level the calibrated threshold keeps to.
    ``calibration_trials``: A/A splits drawn; ``window``: current-window size used in calibration
    (``None`` = the size of the current data); ``max_reference``: cap on the pseudo-reference of
    an A/A split (speed; a smaller reference widens the null, so the threshold errs high).
    ``clusters``: K of :func:`explain_shift`.
    ``novelty_quantile``: quantile of the reference's leave-one-out nearest-neighbour distances
    beyond which a new image is "far" (:func:`nn_novelty`); ``novelty_max_reference``: reference
    rows it uses (seeded subsample; ``None`` = all); ``novel_share_max``: drift with more than
    this share of far new images is of kind ``novel`` (a new domain), else ``shift``.
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
    novelty_quantile: float = 0.99
    novelty_max_reference: int | None = 5000
    novel_share_max: float = 0.5
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
        if not 0.0 < self.novelty_quantile <= 1.0:
            raise ConfigError(f"novelty_quantile must be in (0, 1], not {self.novelty_quantile}")
        if self.novelty_max_reference is not None and self.novelty_max_reference < 2:
            raise ConfigError("novelty_max_reference must be >= 2 or null")
        if not 0.0 <= self.novel_share_max <= 1.0:
            raise ConfigError(f"novel_share_max must be in [0, 1], not {self.novel_share_max}")
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
    """``kind``: ``none`` | ``shift`` | ``novel`` (:func:`drift_kind`)."""

    result: DriftResult
    calibration: Calibration | None
    clusters: pd.DataFrame
    novelty: Novelty
    kind: str
    metrics: dict[str, float]


def analyse(
    reference: np.ndarray,
    current: np.ndarray,
    cfg: DriftConfig,
    reference_ids: np.ndarray | None = None,
) -> DriftAnalysis:
    """Calibrate (unless a threshold is fixed), decide, measure novelty, and explain: the drift
    stage in one call. ``metrics`` holds the verdict's (``drift_score``, ``drift_threshold``,
    ``drift_effect``, ...), the calibration's, the novelty's (``knn_*``) and the clusters'
    (``cluster_max_abs_delta``, ``centroid_novel_share``)."""
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
    novelty = nn_novelty(
        reference, current, cfg.novelty_quantile, cfg.novelty_max_reference, cfg.seed
    )
    kind = drift_kind(result.drift, novelty.novel_share, cfg.novel_share_max)
    clusters = explain_shift(reference, current, cfg.clusters, cfg.seed, reference_ids)
    metrics = result.metrics()
    metrics.update(novelty.metrics())
    if calibration is not None:
        metrics.update(calibration.metrics())
    grown = clusters[clusters["cluster"] >= 0]
    metrics["cluster_max_abs_delta"] = float(grown["delta"].abs().max()) if len(grown) else 0.0
    far = clusters.loc[clusters["cluster"] == -1, "cur_share"]
    metrics["centroid_novel_share"] = float(far.iloc[0])
    return DriftAnalysis(result, calibration, clusters, novelty, kind, metrics)
