"""Keywords per image and the zero-shot restricted-content check, on hand-made embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from imgsearch.categorize.keywords import image_keywords, precision_at_k, vocabulary
from imgsearch.errors import ConfigError
from imgsearch.search.restricted_images import calibrate, flag_quality, restricted_scores

AXES = {"cat": 0, "dog": 1, "car": 2, "tree": 3}


def encode(words):
    out = np.zeros((len(words), 4), np.float32)
    for i, w in enumerate(words):
        out[i, AXES[w]] = 1.0
    return out


def test_keywords_rank_the_vocabulary_and_precision_counts_true_tags():
    texts = pd.DataFrame(
        [
            {"item_id": "a", "lang": "en", "kind": "tag", "text": "Cat "},
            {"item_id": "b", "lang": "en", "kind": "tag", "text": "cat"},
            {"item_id": "b", "lang": "en", "kind": "tag", "text": "dog"},
            {"item_id": "c", "lang": "en", "kind": "tag", "text": "dog"},
            {"item_id": "c", "lang": "en", "kind": "tag", "text": "car"},
            {"item_id": "d", "lang": "en", "kind": "tag", "text": "car"},
            {"item_id": "d", "lang": "en", "kind": "tag", "text": "tree"},  # one item: not in vocab
        ]
    )
    vocab = vocabulary(texts, min_items=2)
    assert vocab["keyword"].tolist() == ["car", "cat", "dog"]
    images = pd.DataFrame({"image_id": ["a/1", "c/1"], "item_id": ["a", "c"]})
    emb = np.array([[1.0, 0.1, 0, 0], [0, 0.2, 1.0, 0]], np.float32)
    kw = image_keywords(images["image_id"], emb, vocab, encode, k=2)
    assert kw[kw["image_id"] == "a/1"]["keyword"].tolist() == ["cat", "dog"]
    assert kw[kw["image_id"] == "c/1"]["keyword"].tolist() == ["car", "dog"]
    p = precision_at_k(kw, images, texts, vocab, k=2)
    assert p["keywords_en_precision_at_2"] == pytest.approx((0.5 + 1.0) / 2)


def test_restricted_threshold_is_calibrated_to_the_target_recall():
    rng = np.random.default_rng(0)
    truth = np.r_[np.ones(20, bool), np.zeros(80, bool)]
    scores = np.r_[rng.normal(0.6, 0.1, 20), rng.normal(0.3, 0.1, 80)]
    cal = calibrate(scores, truth, target_recall=0.9)
    assert cal.val_recall >= 0.9
    q = flag_quality(scores, truth, cal.threshold)
    assert q["recall"] >= 0.9 and q["precision"] > 0.5
    term = np.array([[1.0, 0, 0, 0]], np.float32)
    assert restricted_scores(np.eye(4, dtype=np.float32), term).tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ConfigError):
        calibrate(scores, np.zeros(100, bool))
