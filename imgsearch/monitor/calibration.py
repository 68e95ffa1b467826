"""A/A calibration of the drift threshold: the score's null distribution and a conformal threshold."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from imgsearch.errors import ConfigError
from imgsearch.monitor.scores import EVIDENTLY_THRESHOLDS, _as_2d, _check_method, drift_score

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """A/A calibration: ``null_scores`` are scores of disjoint reference subsamples."""

    method: str
    threshold: float
    false_alarm_rate: float  # the configured level
    window: int
    n_reference: int  # size of the pseudo-reference of each trial
    null_scores: np.ndarray = field(repr=False)
    evidently_threshold: float = math.nan

    @property
    def in_sample_rate(self) -> float:
        """Share of the A/A trials the calibrated threshold flags (<= the level by construction)."""
        return float(np.mean(self.null_scores > self.threshold))

    @property
    def evidently_default_rate(self) -> float:
        """Share of the A/A trials Evidently's default fixed threshold flags."""
        return float(np.mean(self.null_scores > self.evidently_threshold))

    def metrics(self) -> dict[str, float]:
        q = np.quantile(self.null_scores, [0.5, 0.95]) if self.null_scores.size else [np.nan] * 2
        return {
            "aa_threshold": self.threshold,
            "aa_false_alarm_target": self.false_alarm_rate,
            "aa_false_alarm_rate": self.in_sample_rate,
            "aa_evidently_default_threshold": self.evidently_threshold,
            "aa_evidently_default_false_alarm_rate": self.evidently_default_rate,
            "aa_trials": float(self.null_scores.size),
            "aa_window": float(self.window),
            "aa_null_median": float(q[0]),
            "aa_null_q95": float(q[1]),
        }


def aa_sizes(n: int, window: int) -> tuple[int, int]:
    """Pseudo-reference and pseudo-current sizes for A/A splits of ``n`` reference rows.

    The production shape is (all ``n`` reference rows) vs (``window`` new rows); an A/A split must
    be disjoint, so it uses ``n - window`` vs ``window`` when the reference holds at least twice the
    window, else halves (the window shrinks to ``n // 2``, which makes the threshold conservative
    for the statistics whose null spread shrinks with sample size).
    """
    if n < 4:
        raise ValueError(f"calibration needs at least 4 reference rows, got {n}")
    window = max(2, int(window))
    if n >= 2 * window:
        return n - window, window
    return n - n // 2, n // 2


def conformal_threshold(null_scores: np.ndarray, level: float) -> float:
    """The ``ceil((T + 1)(1 - level))``-th smallest of ``T`` null scores.

    A new exchangeable A/A score exceeds it with probability <= ``level`` (split-conformal rank
    argument); with too few trials for the level it is the maximum (conservative).
    """
    scores = np.sort(np.asarray(null_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no null scores")
    rank = math.ceil((scores.size + 1) * (1.0 - level))
    return float(scores[min(rank, scores.size) - 1])


def calibrate(
    reference: np.ndarray,
    window: int,
    method: str = "mmd",
    false_alarm_rate: float = 0.05,
    n_trials: int = 100,
    seed: int = 0,
    *,
    max_reference: int | None = None,
    pca_components: int | None = None,
    distance: str = "euclidean",
    component_threshold: float = 0.1,
) -> Calibration:
    """A/A check: score ``n_trials`` disjoint random splits of ``reference`` (sizes by
    :func:`aa_sizes`) and pick the threshold whose false-alarm rate is <= ``false_alarm_rate``
    (:func:`conformal_threshold`). The result also says how often Evidently's default fixed
    threshold would have raised a false alarm on the same splits. ``max_reference`` caps the
    pseudo-reference size (faster; errs towards a higher threshold).
    """
    _check_method(method)
    if not 0.0 < false_alarm_rate < 1.0:
        raise ConfigError(f"false_alarm_rate must be in (0, 1), not {false_alarm_rate}")
    ref = _as_2d("reference", reference)
    n_ref, n_cur = aa_sizes(ref.shape[0], window)
    if max_reference:
        n_ref = min(n_ref, int(max_reference))
    if math.ceil((n_trials + 1) * (1.0 - false_alarm_rate)) > n_trials:
        log.warning(
            "%d A/A trials cannot resolve a %.3f false-alarm rate: using the maximum null score",
            n_trials,
            false_alarm_rate,
        )
    rng = np.random.default_rng(seed)
    scores = np.empty(n_trials, dtype=np.float64)
    for t in range(n_trials):
        perm = rng.permutation(ref.shape[0])
        scores[t] = drift_score(
            ref[perm[:n_ref]],
            ref[perm[n_ref : n_ref + n_cur]],
            method,
            pca_components=pca_components,
            distance=distance,
            component_threshold=component_threshold,
        )
    return Calibration(
        method=method,
        threshold=conformal_threshold(scores, false_alarm_rate),
        false_alarm_rate=false_alarm_rate,
        window=n_cur,
        n_reference=n_ref,
        null_scores=scores,
        evidently_threshold=EVIDENTLY_THRESHOLDS[method],
    )
