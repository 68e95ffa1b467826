"""Validation during fine-tuning uses the one retrieval implementation of imgsearch.evaluate."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from imgsearch import schema
from imgsearch.evaluate.retrieval import EvaluateConfig, evaluate, retrieval_scores
from imgsearch.train.validation import val_scores


def _data(n_items: int = 7, per_item: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"i{k}" for k in range(n_items)], per_item)
    centres = rng.normal(size=(n_items, 5))
    emb = np.repeat(centres, per_item, axis=0) + 0.8 * rng.normal(size=(len(labels), 5))
    return emb.astype(np.float32), labels


def test_val_scores_match_the_evaluate_stage() -> None:
    emb, labels = _data()
    ids = np.array([f"{i:03d}" for i in range(len(labels))])  # sorted: evaluate's gallery order
    manifest = pd.DataFrame({schema.IMAGE_ID: ids, schema.ITEM_ID: labels, schema.SPLIT: "val"})
    cfg = EvaluateConfig(split="val", ks=(1,), feature_quality=False, plots=False)
    reference = evaluate(ids, emb, manifest, cfg).metrics
    got = val_scores(emb, labels)
    assert got["map_at_r"] == pytest.approx(reference["map_at_r"], abs=1e-12)
    assert got["map"] == pytest.approx(reference["map"], abs=1e-12)
    assert got["recall_at_1"] == pytest.approx(reference["hit_at_1"], abs=1e-12)
    assert 0 < got["embedding_std"] < 1


def test_full_ranking_adds_map_and_keeps_the_truncated_figures() -> None:
    emb, labels = _data(seed=1)
    short = retrieval_scores(emb, labels, ks=(1,))
    full = retrieval_scores(emb, labels, ks=(1,), full_ranking=True)
    assert "map" not in short and 0 < full["map"] <= 1
    for key in short:
        assert full[key] == pytest.approx(short[key], abs=1e-12)


def test_val_scores_without_queries_are_nan() -> None:
    emb, labels = _data()
    one = val_scores(emb[:1], labels[:1])
    assert math.isnan(one["map_at_r"]) and math.isnan(one["map"]) and one["embedding_std"] == 0
    none = val_scores(np.zeros((0, 5), np.float32), np.array([], dtype=str))
    assert math.isnan(none["map_at_r"]) and math.isnan(none["embedding_std"])
    sampled = val_scores(emb, labels, max_queries=5, seed=3)
    assert math.isfinite(sampled["map_at_r"])
