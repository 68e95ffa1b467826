"""Alignment (LiT) on a small synthetic catalog: text search of unseen items beats chance."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from imgsearch.errors import ConfigError
from imgsearch.evaluate.text_search import evaluate_text_search, headline, text_queries
from imgsearch.train.align import AlignConfig, _Groups, align, project

COLOURS = ["red", "green", "blue", "black", "white", "yellow"]
SHAPES = ["cat", "car", "tree", "house", "ball", "fish", "star"]


class WordTower:
    """Frozen bag-of-words features over a fixed vocabulary (a stand-in for a text tower)."""

    name = "words"

    def __init__(self) -> None:
        self.vocab = {w: i for i, w in enumerate(COLOURS + SHAPES + ["a", "big"])}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.vocab)), np.float32)
        for row, text in enumerate(texts):
            for word in text.replace(",", " ").split():
                if word in self.vocab:
                    out[row, self.vocab[word]] = 1.0
        return out


def synthetic(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Items are (colour, shape) pairs; an image embedding is the sum of the two concepts' vectors
    plus noise, so a map learned on some pairs generalises to unseen pairs."""
    rng = np.random.default_rng(seed)
    dim = 16
    concept = {w: rng.standard_normal(dim) for w in COLOURS + SHAPES}
    pairs = list(itertools.product(COLOURS, SHAPES))
    order = rng.permutation(len(pairs))
    split_of = {
        i: ("test" if n < 10 else "val" if n < 18 else "train") for n, i in enumerate(order)
    }
    texts, images, emb = [], [], []
    for i, (colour, shape) in enumerate(pairs):
        item = f"item{i}"
        texts += [
            {"item_id": item, "lang": "en", "kind": "label", "text": f"{colour} {shape}"},
            {"item_id": item, "lang": "en", "kind": "tag", "text": colour},
            {"item_id": item, "lang": "en", "kind": "tag", "text": shape},
        ]
        for j in range(3):
            images.append({"image_id": f"{item}/{j}", "item_id": item, "split": split_of[i]})
            emb.append(concept[colour] + concept[shape] + 0.3 * rng.standard_normal(dim))
    return pd.DataFrame(texts), pd.DataFrame(images), np.asarray(emb, np.float32)


@pytest.mark.parametrize("batch_by", ["item", "text"])
def test_alignment_beats_chance_on_unseen_items(batch_by: str) -> None:
    texts, images, emb = synthetic()
    cfg = AlignConfig(epochs=60, batch_items=16, lr=0.01, patience=60, batch_by=batch_by)
    result = align(texts, images, emb, WordTower(), cfg)
    assert 1 <= result.best_epoch <= 60
    assert result.n_train_items == 42 - 18
    tower = WordTower()
    scores = evaluate_text_search(
        lambda t: project(result.head, tower.encode(t)), texts, images, emb, split="test"
    )
    m = scores.metrics
    assert m["text_label_en_n_queries"] == 10
    assert m["text_label_en_hit_at_1"] > m["chance_text_label_en_hit_at_1"] + 0.3
    assert m["text_label_en_map_at_r"] > 2 * m["chance_text_label_en_map_at_r"]
    table = headline(m)
    assert set(table["kind"]) == {"label", "tags"} and set(table["lang"]) == {"en"}
    assert scores.per_query["top_ids"].str.count(";").eq(4).all()  # top-5 ids per query


def test_groups_draw_one_row_of_each_item_uniformly() -> None:
    """Against the obvious reference (each item's rows by a scan): a draw is always one of the
    item's own rows, and every row of an item comes up about equally often."""
    rng = np.random.default_rng(0)
    index = rng.integers(0, 7, size=60)
    index[:7] = np.arange(7)  # every item has a row
    groups = _Groups(index, 7)
    for item in range(7):
        assert sorted(groups[item]) == [r for r in range(60) if index[r] == item]
    items = np.repeat(np.arange(7), 4000)
    drawn = groups.draw(items, np.random.default_rng(1))
    assert (index[drawn] == items).all()
    for item in range(7):
        counts = np.bincount(drawn[items == item], minlength=60)[groups[item]]
        assert counts.min() > 0.8 * 4000 / len(counts) and counts.max() < 1.2 * 4000 / len(counts)


def test_training_never_sees_test_items():
    texts, images, emb = synthetic()
    seen: list[str] = []

    class Spy(WordTower):
        def fit(self, train_texts: Sequence[str]) -> None:
            seen.extend(train_texts)

    align(texts, images, emb, Spy(), AlignConfig(epochs=2, batch_items=8))
    held_out = set(images.loc[images["split"] != "train", "item_id"])
    labels = texts[texts["kind"] == "label"]
    assert seen and set(seen).isdisjoint(labels.loc[labels["item_id"].isin(held_out), "text"])


def test_tag_queries_join_an_items_tags_per_language():
    texts = pd.DataFrame(
        [
            {"item_id": "1", "lang": "en", "kind": "tag", "text": "cat"},
            {"item_id": "1", "lang": "en", "kind": "tag", "text": "pet"},
            {"item_id": "1", "lang": "ru", "kind": "tag", "text": "кошка"},
            {"item_id": "1", "lang": "en", "kind": "label", "text": "cat face"},
            {"item_id": "2", "lang": "en", "kind": "name", "text": "not a query"},
        ]
    )
    q = text_queries(texts, ["1", "2"])
    assert sorted(q["query"]) == ["cat face", "cat, pet", "кошка"]


def test_bad_inputs_are_refused():
    texts, images, emb = synthetic()
    with pytest.raises(ConfigError, match="lacks columns"):
        align(texts.drop(columns="lang"), images, emb, WordTower(), AlignConfig(epochs=1))
    with pytest.raises(ConfigError, match="embeddings for"):
        align(texts, images, emb[:-1], WordTower(), AlignConfig(epochs=1))
    with pytest.raises(ConfigError, match="validation items"):
        align(texts, images.assign(split="train"), emb, WordTower(), AlignConfig(epochs=1))
    with pytest.raises(ConfigError, match="image_target"):
        AlignConfig(image_target="mean")
    with pytest.raises(ConfigError, match="batch_by"):
        AlignConfig(batch_by="image")


class _Terms:
    def terms(self) -> list[str]:
        return ["child"]


class _Encoder:
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.tile(np.array([[1.0, 0.0]], np.float32), (len(texts), 1))


@pytest.mark.parametrize(("innocent_score", "used"), [(0.1, True), (0.95, False)])
def test_the_zero_shot_restricted_check_is_used_only_when_precise(
    innocent_score: float, used: bool
) -> None:
    """Restricted images score 0.9 against the term; innocent ones ``innocent_score``. A check
    that would flag the innocent images too (low val precision) flags nothing and says so."""
    from steps.align import _flags

    n = 40
    restricted = (np.arange(n) // 2) % 4 == 0  # in both val (odd) and test (even)
    score = np.where(restricted, 0.9, innocent_score)
    emb = np.stack([score, np.sqrt(1 - score**2)], axis=1).astype(np.float32)
    images = pd.DataFrame(
        {
            "image_id": [f"i{i}" for i in range(n)],
            "item_id": [f"item{i}" for i in range(n)],
            "split": ["val" if i % 2 else "test" for i in range(n)],
        }
    )
    blocked = pd.DataFrame({"item_id": [f"item{i}" for i in range(n) if restricted[i]]})
    flags, metrics = _flags(_Encoder(), _Terms(), blocked, images, emb, 0.8, 0.5)  # type: ignore[arg-type]
    assert metrics["restricted_flag_enabled"] == float(used)
    assert flags["flagged"].to_numpy().tolist() == (restricted & used).tolist()
    assert metrics["restricted_flag_val_recall"] >= 0.8
