"""Cross-modal (text -> image) retrieval figures against a slow, obviously-correct reference."""

from __future__ import annotations

import numpy as np
import pytest

from imgsearch.evaluate.cross_modal import chance_scores, cross_modal_scores, top_order


def _reference(q, q_labels, g, g_labels, k):
    hits, aps = [], []
    for i in range(len(q)):
        scores = [float(np.dot(q[i], g[j])) for j in range(len(g))]
        ranked = sorted(range(len(g)), key=lambda j: (-scores[j], j))
        rel = [g_labels[j] == q_labels[i] for j in ranked]
        r = sum(rel)
        if r == 0:
            continue
        hits.append(float(any(rel[:k])))
        found, total = 0, 0.0
        for rank, is_rel in enumerate(rel[:r], start=1):
            if is_rel:
                found += 1
                total += found / rank
        aps.append(total / r)
    return float(np.mean(hits)), float(np.mean(aps)), len(hits)


def test_scores_match_the_reference():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((40, 8)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g_labels = rng.integers(0, 10, 40).astype(str)
    q = rng.standard_normal((25, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q_labels = rng.integers(0, 12, 25).astype(str)  # some items have no image: left out
    metrics, per_query = cross_modal_scores(q, q_labels, g, g_labels, ks=(1, 5))
    hit5, map_r, n = _reference(q, q_labels, g, g_labels, 5)
    assert metrics["n_queries"] == n
    assert metrics["n_queries"] + metrics["n_queries_without_relevant"] == 25
    assert metrics["hit_at_5"] == pytest.approx(hit5)
    assert metrics["map_at_r"] == pytest.approx(map_r)
    assert len(per_query["hit_at_1"]) == 25


def test_perfect_queries_score_one_and_chance_is_low():
    g = np.eye(6, dtype=np.float32)
    labels = np.array(["a", "a", "b", "b", "c", "c"])
    q = np.array([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]], dtype=np.float32) / np.sqrt(2)
    metrics, _ = cross_modal_scores(q, ["a", "b"], g, labels, ks=(1,))
    assert metrics["hit_at_1"] == 1.0 and metrics["map_at_r"] == 1.0
    chance = chance_scores(["a", "b"], labels, ks=(1,), seeds=20)
    assert 0.1 < chance["hit_at_1"] < 0.6  # 2 relevant of 6: 1/3 expected


def test_top_order_partial_equals_full_sort():
    rng = np.random.default_rng(1)
    neg = rng.integers(0, 5, (7, 30)).astype(np.float32)  # many ties
    full = np.argsort(neg, axis=1, kind="stable")
    for length in (0, 1, 3, 29, 30, 50):
        part = top_order(neg, length)
        assert np.array_equal(
            np.take_along_axis(neg, part, 1), np.take_along_axis(neg, full[:, : part.shape[1]], 1)
        )


def test_mismatched_dims_are_refused():
    with pytest.raises(ValueError, match="same D"):
        cross_modal_scores(np.zeros((2, 3)), ["a", "b"], np.zeros((4, 5)), list("abcd"))
