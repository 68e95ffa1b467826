"""Retrieval metrics vs slow, obviously-correct references (and scikit-learn); feature quality sanity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from imgsearch.evaluate import metrics as M

# --- naive references: one query at a time, plain Python loops -------------------------------


def ref_hit(rel: list[bool], k: int) -> float:
    return 1.0 if any(rel[:k]) else 0.0


def ref_precision(rel: list[bool], k: int) -> float:
    return sum(rel[:k]) / k


def ref_recall(rel: list[bool], k: int, n_rel: int) -> float:
    return sum(rel[:k]) / n_rel


def ref_ap(rel: list[bool], n_rel: int) -> float:
    total, found = 0.0, 0
    for i, r in enumerate(rel, start=1):
        if r:
            found += 1
            total += found / i
    return total / n_rel


def ref_ap_at_r(rel: list[bool], n_rel: int) -> float:
    total, found = 0.0, 0
    for i, r in enumerate(rel[:n_rel], start=1):
        if r:
            found += 1
            total += found / i
    return total / n_rel


def random_case(seed: int, q: int = 40, g: int = 30, n_labels: int = 6):
    """Random full rankings: each query has a label, the gallery (query excluded) has labels."""
    rng = np.random.default_rng(seed)
    gallery_labels = rng.integers(0, n_labels, size=(q, g))
    for row in gallery_labels:
        rng.shuffle(row)
    query_labels = rng.integers(0, n_labels + 1, size=q)  # label n_labels never occurs: no relevant
    rel = M.relevance_from_labels(gallery_labels, query_labels)
    n_rel = rel.sum(axis=1)
    return rel, n_rel


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_per_query_metrics_match_reference(seed: int) -> None:
    rel, n_rel = random_case(seed)
    ks = (1, 3, 5, 10)
    got = M.per_query_metrics(rel, n_rel, ks)
    assert (n_rel == 0).any() and (n_rel > 0).any()
    for q in range(len(rel)):
        row = [bool(v) for v in rel[q]]
        r = int(n_rel[q])
        if r == 0:
            assert all(np.isnan(v[q]) for v in got.values())
            continue
        for k in ks:
            assert got[f"hit_at_{k}"][q] == ref_hit(row, k)
            assert got[f"precision_at_{k}"][q] == pytest.approx(ref_precision(row, k))
            assert got[f"recall_at_{k}"][q] == pytest.approx(ref_recall(row, k, r))
        assert got["ap"][q] == pytest.approx(ref_ap(row, r))
        assert got["ap_at_r"][q] == pytest.approx(ref_ap_at_r(row, r))
        assert got["r_precision"][q] == pytest.approx(sum(row[:r]) / r)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_matches_sklearn_on_tie_free_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(20):
        g = int(rng.integers(5, 60))
        y = rng.random(g) < 0.3
        if not y.any():
            y[0] = True
        scores = rng.permutation(g).astype(float)  # distinct: no ties
        order = np.argsort(-scores)
        got = M.per_query_metrics(y[order][None, :], np.array([y.sum()]), ks=(1,))["ap"][0]
        assert got == pytest.approx(average_precision_score(y, scores))


def test_sklearn_groups_ties_where_a_ranking_does_not() -> None:
    # Documented difference: with tied scores sklearn treats the tie as one threshold; a ranking
    # orders the tied items. Relevant item ranked first among two tied -> AP 1; sklearn -> 0.5.
    y = np.array([True, False])
    scores = np.array([0.5, 0.5])
    ours = M.per_query_metrics(np.array([[True, False]]), np.array([1]), ks=(1,))["ap"][0]
    assert ours == 1.0
    assert average_precision_score(y, scores) == pytest.approx(0.5)


def test_hand_built_edge_cases() -> None:
    rel = np.array(
        [
            [True, True, True, False, False],  # all relevant first: everything 1
            [False, False, False, False, False],  # no relevant in the gallery
            [False, False, False, True, True],  # relevant last
            [False, True, False, False, False],  # one relevant at rank 2
        ]
    )
    n_rel = np.array([3, 0, 2, 1])
    got = M.per_query_metrics(rel, n_rel, ks=(1, 2, 5))
    assert got["ap"][0] == got["ap_at_r"][0] == got["hit_at_1"][0] == got["recall_at_5"][0] == 1.0
    assert got["precision_at_5"][0] == pytest.approx(3 / 5)
    assert np.isnan(got["ap"][1]) and np.isnan(got["hit_at_1"][1])
    assert got["ap"][2] == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert got["ap_at_r"][2] == 0.0 and got["hit_at_2"][2] == 0.0 and got["hit_at_5"][2] == 1.0
    assert (
        got["ap"][3] == pytest.approx(0.5)
        and got["ap_at_r"][3] == 0.0
        and got["hit_at_2"][3] == 1.0
    )
    agg = M.retrieval_metrics(rel, n_rel, ks=(1, 2, 5))
    assert agg["n_queries"] == 3 and agg["n_queries_without_relevant"] == 1
    assert agg["map"] == pytest.approx(np.mean([1.0, (1 / 4 + 2 / 5) / 2, 0.5]))
    assert agg["hit_at_1"] == pytest.approx(1 / 3)


def test_truncated_ranking_counts_missing_relevant_as_zero() -> None:
    # 3 relevant in the gallery but only 1 within the first 4 ranks: AP is a lower bound.
    got = M.per_query_metrics(np.array([[False, True, False, False]]), np.array([3]), ks=(4,))
    assert got["ap"][0] == pytest.approx((1 / 2) / 3)
    assert got["recall_at_4"][0] == pytest.approx(1 / 3)


def test_no_query_has_relevant_gives_nan_means() -> None:
    agg = M.retrieval_metrics(np.zeros((2, 3), dtype=bool), np.array([0, 0]))
    assert agg["n_queries"] == 0 and agg["n_queries_without_relevant"] == 2
    assert np.isnan(agg["map"]) and np.isnan(agg["hit_at_1"])


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        M.per_query_metrics(np.ones((2, 3), dtype=bool), np.array([1, 1]))  # 3 found > 1 relevant
    with pytest.raises(ValueError):
        M.per_query_metrics(np.ones((2, 3), dtype=bool), np.array([3]))
    with pytest.raises(ValueError):
        M.per_query_metrics(np.ones((1, 3), dtype=bool), np.array([3]), ks=(0,))


def test_metric_names_match_aggregate_keys() -> None:
    rel, n_rel = random_case(5)
    agg = M.retrieval_metrics(rel, n_rel, ks=(1, 5))
    assert set(M.metric_names((1, 5))) | {"n_queries", "n_queries_without_relevant"} == set(agg)


# --- feature quality -------------------------------------------------------------------------


def ref_class_distances(emb: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    intra, inter = [], []
    for i, j in itertools.combinations(range(len(x)), 2):
        d = 1.0 - float(x[i] @ x[j])
        (intra if labels[i] == labels[j] else inter).append(d)
    return float(np.mean(intra)), float(np.mean(inter))


def test_class_distances_match_pairwise_reference() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(37, 8))
    labels = rng.integers(0, 6, size=37)
    got = M.class_distances(emb, labels)
    assert got == pytest.approx(ref_class_distances(emb, labels))


def clustered(n_classes: int, per_class: int, dim: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    emb = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return emb.astype(np.float32), labels


def test_feature_quality_separates_tight_clusters_from_noise() -> None:
    emb, labels = clustered(8, 6, 32, noise=0.05)
    good = M.feature_quality(emb, labels)
    rng = np.random.default_rng(1)
    bad = M.feature_quality(rng.normal(size=emb.shape), labels)
    assert good["fq_nmi"] > 0.95 and good["fq_ari"] > 0.9 and good["fq_silhouette"] > 0.8
    assert (
        good["fq_ratio"] < 0.1 and good["fq_kmeans_k"] == 8 and good["fq_kmeans_on_category"] == 0
    )
    assert abs(bad["fq_ari"]) < 0.15 and abs(bad["fq_silhouette"]) < 0.15
    assert 0.9 < bad["fq_ratio"] < 1.1


def test_feature_quality_falls_back_to_categories_when_too_many_classes() -> None:
    emb, labels = clustered(12, 3, 16, noise=0.05)
    categories = labels % 3
    out = M.feature_quality(emb, labels, categories=categories, max_clusters=5)
    assert out["fq_kmeans_k"] == 3 and out["fq_kmeans_on_category"] == 1
    out_none = M.feature_quality(emb, labels, max_clusters=5)
    assert np.isnan(out_none["fq_nmi"])


def test_embedding_std_detects_collapse() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 64))
    collapsed = base + 1e-4 * rng.normal(size=(200, 64))
    spread = rng.normal(size=(200, 64))
    labels = np.arange(200) % 10
    assert M.feature_quality(collapsed, labels)["fq_embedding_std"] < 1e-3
    assert M.feature_quality(spread, labels)["fq_embedding_std"] == pytest.approx(1 / 8, rel=0.1)


def test_silhouette_samples_whole_classes() -> None:
    emb, labels = clustered(50, 4, 16, noise=0.05)
    idx = M._sample_by_class(labels, 30, seed=0)
    kept = labels[idx]
    assert 30 <= len(idx) < 34
    assert all((kept == c).sum() == 4 for c in np.unique(kept))
    assert M.feature_quality(emb, labels, sample_size=30)["fq_silhouette"] > 0.8
