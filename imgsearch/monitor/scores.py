"""The four drift statistics (Evidently 0.7's embedding-drift methods on numpy arrays) and the verdict.

- ``mmd``: unbiased squared maximum mean discrepancy (Gretton et al. 2012) with an RBF kernel,
  bandwidth by the median heuristic; computed block-wise so no N x M kernel matrix is held.
- ``model``: ROC AUC of a logistic SGD domain classifier (reference vs current) on a 50% hold-out.
- ``ratio``: share of dimensions whose normed Wasserstein distance is >= ``component_threshold``.
- ``distance``: distance between the two mean embeddings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from imgsearch.errors import ConfigError

METHODS = ("mmd", "model", "ratio", "distance")
#: Evidently 0.7's default thresholds (used when no threshold is given and none is calibrated).
EVIDENTLY_THRESHOLDS = {"mmd": 0.015, "model": 0.55, "ratio": 0.2, "distance": 0.2}
DISTANCES = ("euclidean", "cosine", "cityblock", "chebyshev")
_MMD_MEDIAN_SAMPLE = 1000  # Evidently's sample size for the median-heuristic bandwidth
_BLOCK = 1024  # rows per kernel block


@dataclass
class DriftResult:
    method: str
    score: float
    threshold: float
    drift: bool
    n_reference: int
    n_current: int
    seconds: float

    @property
    def shown_score(self) -> float:
        """The score as shown to a person: never negative (MMD^2_u dips below 0 by chance when
        nothing changed; Evidently also shows ``max(score, 0)``). The verdict uses ``score``."""
        return max(self.score, 0.0)

    @property
    def effect(self) -> float:
        """Effect size: the shown score over the threshold (``> 1`` means drift, ``300`` means
        300 times the level that A/A splits reach at the false-alarm rate). Clipped at 0; NaN when
        the threshold is not positive (no scale to compare with). For ``mmd`` it is a ratio of
        squared MMDs."""
        if self.threshold <= 0:
            return float("nan")
        return self.shown_score / self.threshold

    def metrics(self) -> dict[str, float]:
        return {
            "drift_score": self.shown_score,
            "drift_score_signed": self.score,
            "drift_threshold": self.threshold,
            "drift_detected": float(self.drift),
            "drift_effect": self.effect,
            "n_reference": float(self.n_reference),
            "n_current": float(self.n_current),
            "drift_seconds": self.seconds,
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
