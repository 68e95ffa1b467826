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
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from imgsearch import schema
from imgsearch.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("mmd", "model", "ratio", "distance")
#: Evidently 0.7's default thresholds (used when no threshold is given and none is calibrated).
EVIDENTLY_THRESHOLDS = {"mmd": 0.015, "model": 0.55, "ratio": 0.2, "distance": 0.2}
DISTANCES = ("euclidean", "cosine", "cityblock", "chebyshev")
_MMD_MEDIAN_SAMPLE = 1000  # Evidently's sample size for the median-heuristic bandwidth
_BLOCK = 1024  # rows per kernel block


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
class DriftResult:
    method: str
    score: float
    threshold: float
    drift: bool
    n_reference: int
    n_current: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {
            "drift_score": self.score,
            "drift_threshold": self.threshold,
            "drift_detected": float(self.drift),
            "n_reference": float(self.n_reference),
            "n_current": float(self.n_current),
            "drift_seconds": self.seconds,
        }


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


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"drift method must be one of {METHODS}, not {method!r}")


def _as_2d(name: str, x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be a 2-D array with at least 2 rows, got {arr.shape}")
    return arr


# --- the four scores ------------------------------------------------------------------------


def _pca(reference: np.ndarray, current: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    pca = PCA(n_components=n, random_state=0)
    return pca.fit_transform(reference), pca.transform(current)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _kernel_sum(a: np.ndarray, b: np.ndarray, gamma: float) -> float:
    """Sum of ``exp(-gamma * |a_i - b_j|^2)`` over all pairs, one block of rows at a time."""
    total = 0.0
    for start in range(0, a.shape[0], _BLOCK):
        total += float(np.exp(-gamma * _sq_dists(a[start : start + _BLOCK], b)).sum())
    return total


def mmd2u(x: np.ndarray, y: np.ndarray, gamma: float) -> float:
    """Unbiased MMD^2 with RBF kernel ``exp(-gamma d^2)``; diagonals (k(x,x) = 1) are excluded."""
    m, n = x.shape[0], y.shape[0]
    kxx = (_kernel_sum(x, x, gamma) - m) / (m * (m - 1.0))
    kyy = (_kernel_sum(y, y, gamma) - n) / (n * (n - 1.0))
    kxy = _kernel_sum(x, y, gamma) / (m * n)
    return kxx + kyy - 2.0 * kxy


def median_gamma(x: np.ndarray, y: np.ndarray) -> float:
    """Evidently's bandwidth: 1 / median(|x_i - y_j|)^2 on (up to) 1,000 rows of each, seed 0."""
    # pandas' DataFrame.sample(k, random_state=0) draws RandomState(0).choice(n, k, replace=False)
    xi = np.random.RandomState(0).choice(x.shape[0], min(x.shape[0], _MMD_MEDIAN_SAMPLE), False)
    yi = np.random.RandomState(0).choice(y.shape[0], min(y.shape[0], _MMD_MEDIAN_SAMPLE), False)
    med = float(np.median(np.sqrt(_sq_dists(x[xi], y[yi]))))
    if med <= 0.0:
        return 1.0
    return 1.0 / med**2


def _model_auc(reference: np.ndarray, current: np.ndarray) -> float:
    from sklearn.linear_model import SGDClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    data = np.vstack([reference, current])
    target = np.r_[np.ones(reference.shape[0], dtype=int), np.zeros(current.shape[0], dtype=int)]
    x_train, x_test, y_train, y_test = train_test_split(
        data, target, test_size=0.5, random_state=42, shuffle=True
    )
    clf = SGDClassifier(loss="log_loss", random_state=42)
    clf.fit(x_train, y_train)
    return float(roc_auc_score(y_test, clf.predict_proba(x_test)[:, 1]))


def _ratio(reference: np.ndarray, current: np.ndarray, component_threshold: float) -> float:
    from scipy.stats import wasserstein_distance

    drifted = 0
    for i in range(reference.shape[1]):
        norm = max(float(np.std(reference[:, i])), 0.001)
        if wasserstein_distance(reference[:, i], current[:, i]) / norm >= component_threshold:
            drifted += 1
    return drifted / reference.shape[1]


def _distance(reference: np.ndarray, current: np.ndarray, metric: str) -> float:
    from scipy.spatial import distance as sd

    fn = {
        "euclidean": sd.euclidean,
        "cosine": sd.cosine,
        "cityblock": sd.cityblock,
        "chebyshev": sd.chebyshev,
    }[metric]
    return float(fn(reference.mean(axis=0), current.mean(axis=0)))


def drift_score(
    reference: np.ndarray,
    current: np.ndarray,
    method: str = "mmd",
    *,
    pca_components: int | None = None,
    distance: str = "euclidean",
    component_threshold: float = 0.1,
) -> float:
    """The raw drift statistic of ``method`` (higher = more drift).

    ``reference`` ``(N, D)``, ``current`` ``(M, D)``; raises ``ValueError`` on other shapes and
    :class:`ConfigError` on an unknown method. For ``mmd`` the signed MMD^2_u is returned (it can
    be slightly negative when nothing changed; Evidently reports ``max(score, 0)``).
    """
    _check_method(method)
    ref, cur = _as_2d("reference", reference), _as_2d("current", current)
    if ref.shape[1] != cur.shape[1]:
        raise ValueError(f"dimension mismatch: reference {ref.shape}, current {cur.shape}")
    if pca_components:
        ref, cur = _pca(ref, cur, pca_components)
    if method == "mmd":
        return mmd2u(ref, cur, median_gamma(ref, cur))
    if method == "model":
        return _model_auc(ref, cur)
    if method == "ratio":
        return _ratio(ref, cur, component_threshold)
    return _distance(ref, cur, distance)


def drift_verdict(
    reference: np.ndarray,
    current: np.ndarray,
    method: str = "mmd",
    threshold: float | None = None,
    *,
    pca_components: int | None = None,
    distance: str = "euclidean",
    component_threshold: float = 0.1,
) -> DriftResult:
    """Drift when the score is strictly above ``threshold`` (default: Evidently's for ``method``).

    Use the threshold of :func:`calibrate` in production; the defaults are uncalibrated guesses.
    """
    _check_method(method)
    t0 = time.perf_counter()
    score = drift_score(
        reference,
        current,
        method,
        pca_components=pca_components,
        distance=distance,
        component_threshold=component_threshold,
    )
    limit = EVIDENTLY_THRESHOLDS[method] if threshold is None else float(threshold)
    return DriftResult(
        method=method,
        score=score,
        threshold=limit,
        drift=bool(score > limit),
        n_reference=int(np.shape(reference)[0]),
        n_current=int(np.shape(current)[0]),
        seconds=time.perf_counter() - t0,
    )


# --- calibration ------------------------------------------------------------------------------


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


# --- what moved ------------------------------------------------------------------------------


def explain_shift(
    reference_emb: np.ndarray,
    current_emb: np.ndarray,
    k: int = 8,
    seed: int = 0,
    reference_ids: np.ndarray | None = None,
    examples: int = 3,
) -> pd.DataFrame:
    """Which K-means clusters of the reference grew or shrank in the current data.

    K-means (``k`` clusters) is fitted on the reference; current rows go to their nearest centroid.
    One row per cluster: ``cluster, ref_count, cur_count, ref_share, cur_share, delta``
    (cur - ref share), ``lift`` (cur / ref share), ``z`` (two-proportion z score) and ``examples``
    (ids, or positions, of the reference rows nearest the centroid), sorted by ``|delta|``, largest
    first. A last row ``cluster = -1`` ("novel") counts current rows farther from every centroid
    than 99% of the reference rows are from theirs.
    """
    from sklearn.cluster import KMeans

    ref = _as_2d("reference_emb", reference_emb)
    cur = _as_2d("current_emb", current_emb)
    k = max(1, min(int(k), ref.shape[0]))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(ref)
    ref_d = km.transform(ref)
    cur_d = km.transform(cur)
    ref_lab, cur_lab = ref_d.argmin(1), cur_d.argmin(1)
    far = float(np.quantile(ref_d.min(1), 0.99))
    novel = cur_d.min(1) > far

    n_r, n_c = ref.shape[0], cur.shape[0]
    ids = np.arange(n_r) if reference_ids is None else np.asarray(reference_ids)
    rows: list[dict[str, Any]] = []

    def row(cluster: int, rc: int, cc: int, near: list[str]) -> dict[str, Any]:
        p_r, p_c = rc / n_r, cc / n_c
        pooled = (rc + cc) / (n_r + n_c)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n_r + 1 / n_c)) if 0 < pooled < 1 else 0.0
        return {
            "cluster": cluster,
            "ref_count": rc,
            "cur_count": cc,
            "ref_share": p_r,
            "cur_share": p_c,
            "delta": p_c - p_r,
            "lift": p_c / p_r if p_r > 0 else math.inf,
            "z": (p_c - p_r) / se if se > 0 else 0.0,
            "examples": ";".join(near),
        }

    for c in range(k):
        near = np.argsort(ref_d[:, c])[:examples]
        rows.append(
            row(
                c,
                int((ref_lab == c).sum()),
                int((cur_lab == c).sum()),
                [str(i) for i in ids[near]],
            )
        )
    table = pd.DataFrame(rows)
    table = table.reindex(table["delta"].abs().sort_values(ascending=False).index)
    novel_row = pd.DataFrame([row(-1, int((ref_d.min(1) > far).sum()), int(novel.sum()), [])])
    return pd.concat([table, novel_row], ignore_index=True)


def _shares(series: pd.Series) -> pd.Series:
    values = series.astype("object").where(series.notna(), "<missing>").astype(str)
    return values.value_counts(normalize=True)


def metadata_shift(
    ref_manifest: pd.DataFrame,
    cur_manifest: pd.DataFrame,
    columns: tuple[str, ...] = (schema.CATEGORY, schema.NSFW, schema.FORMAT),
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Share of each value of ``columns`` (category, NSFW flag, file format) in both manifests.

    Returns ``(table, metrics)``: table rows ``attribute, value, ref_share, cur_share, delta``
    (missing values count as ``"<missing>"``; a column absent from both manifests is skipped),
    sorted by attribute then ``|delta|``; metrics ``tv_<attribute>`` (total variation distance,
    0..1) and ``nsfw_share_ref`` / ``nsfw_share_cur`` when an ``nsfw`` column exists.
    """
    rows: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    for col in columns:
        if col not in ref_manifest.columns and col not in cur_manifest.columns:
            continue
        empty = pd.Series([], dtype="object")
        ref = _shares(ref_manifest[col] if col in ref_manifest.columns else empty)
        cur = _shares(cur_manifest[col] if col in cur_manifest.columns else empty)
        both = pd.concat([ref.rename("ref_share"), cur.rename("cur_share")], axis=1).fillna(0.0)
        both["delta"] = both["cur_share"] - both["ref_share"]
        metrics[f"tv_{col}"] = float(both["delta"].abs().sum() / 2.0)
        both = both.reindex(both["delta"].abs().sort_values(ascending=False).index)
        for value, r in both.iterrows():
            rows.append(
                {
                    "attribute": col,
                    "value": str(value),
                    "ref_share": float(r["ref_share"]),
                    "cur_share": float(r["cur_share"]),
                    "delta": float(r["delta"]),
                }
            )
        if col == schema.NSFW:
            for name, frame in (("ref", ref_manifest), ("cur", cur_manifest)):
                flags = pd.to_numeric(frame.get(col), errors="coerce") if col in frame else None
                if flags is not None and flags.notna().any():
                    metrics[f"nsfw_share_{name}"] = float((flags.dropna() != 0).mean())
    table = pd.DataFrame(rows, columns=["attribute", "value", "ref_share", "cur_share", "delta"])
    return table, metrics


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
