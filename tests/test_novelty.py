"""Nearest-neighbour novelty: against a brute-force reference, and on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from imgsearch.errors import ConfigError
from imgsearch.monitor.novelty import drift_kind, nn_novelty


def unit(x: np.ndarray) -> list[np.ndarray]:
    return [r / np.linalg.norm(r) for r in x.astype(np.float64)]


def leave_one_out(reference: np.ndarray) -> list[float]:
    ref = unit(reference)
    return [
        min(np.linalg.norm(a - b) for j, b in enumerate(ref) if j != i) for i, a in enumerate(ref)
    ]


def brute_force(reference: np.ndarray, current: np.ndarray, quantile: float) -> tuple[float, float]:
    """``(novel_share, distance_ratio)`` by double loops over unit vectors: obviously correct."""
    ref, cur = unit(reference), unit(current)
    loo = leave_one_out(reference)
    nearest = [min(np.linalg.norm(c - r) for r in ref) for c in cur]
    threshold = np.quantile(loo, quantile)
    share = sum(d > threshold for d in nearest) / len(nearest)
    return float(share), float(np.median(nearest) / np.median(loo))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(60, 5))
    cur = np.vstack([rng.normal(size=(20, 5)), rng.normal(size=(10, 5)) + 3.0])
    for q in (0.5, 0.9, 0.99):
        got = nn_novelty(ref, cur, quantile=q, max_reference=None)
        share, ratio = brute_force(ref, cur, q)
        # float32 FAISS vs float64 loops: a distance tied with the threshold could flip one row
        assert got.novel_share == pytest.approx(share, abs=1 / len(cur) + 1e-9)
        assert got.distance_ratio == pytest.approx(ratio, rel=1e-4)
        assert got.n_reference == 60 and got.n_current == 30


def test_duplicate_rows_count_as_neighbours() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(10, 4))
    ref = np.vstack([ref, ref[:3]])  # three exact duplicates: their leave-one-out distance is 0
    got = nn_novelty(ref, ref[:5], quantile=0.5, max_reference=None)
    assert got.reference_median == pytest.approx(np.median(leave_one_out(ref)), rel=1e-4)
    assert got.threshold == pytest.approx(np.quantile(leave_one_out(ref), 0.5), rel=1e-4)
    assert got.novel_share == 0.0 and got.current_median == pytest.approx(0.0, abs=1e-3)


def clustered(n: int, seed: int, centre: np.ndarray, d: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    protos = centre + rng.normal(size=(20, d))
    return protos[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, d))


def test_jittered_copies_are_not_novel_and_far_data_is() -> None:
    d = 32
    ref = clustered(600, 0, np.zeros(d), d)
    rng = np.random.default_rng(1)
    near = ref[rng.choice(600, 200, replace=False)] + 0.05 * rng.normal(size=(200, d))
    far = clustered(200, 2, np.full(d, 4.0), d)
    close = nn_novelty(ref, near, quantile=0.99)
    away = nn_novelty(ref, far, quantile=0.99)
    assert close.novel_share < 0.05 and close.distance_ratio < 1.0
    assert away.novel_share > 0.95 and away.distance_ratio > 2.0


def test_subsample_is_seeded_and_capped() -> None:
    ref = clustered(500, 0, np.zeros(16), 16)
    cur = clustered(50, 5, np.zeros(16), 16)
    a = nn_novelty(ref, cur, max_reference=100, seed=7)
    b = nn_novelty(ref, cur, max_reference=100, seed=7)
    assert a.n_reference == 100 and a.novel_share == b.novel_share
    assert a.threshold == b.threshold


def test_bad_arguments() -> None:
    ref = np.ones((5, 3))
    with pytest.raises(ConfigError):
        nn_novelty(ref, ref, quantile=0.0)
    with pytest.raises(ConfigError):
        nn_novelty(ref, ref, max_reference=1)
    with pytest.raises(ValueError):
        nn_novelty(ref[:1], ref)
    with pytest.raises(ValueError):
        nn_novelty(ref, np.ones((2, 4)))


def test_drift_kind() -> None:
    assert drift_kind(False, 0.9, 0.5) == "none"
    assert drift_kind(True, 0.1, 0.5) == "shift"
    assert drift_kind(True, 0.5, 0.5) == "shift"
    assert drift_kind(True, 0.51, 0.5) == "novel"
