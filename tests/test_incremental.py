"""The pure data rules of incremental improvement (``imgsearch.data.incremental``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from imgsearch.data import incremental
from imgsearch.errors import ConfigError


def _rows(ids: list[str], items: list[str], splits: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"image_id": ids, "item_id": items, "split": splits})


def test_combine_moves_a_new_image_of_a_known_item_to_its_split() -> None:
    old = _rows(["a", "b"], ["x", "y"], ["train", "test"])
    new = _rows(["c", "d", "b"], ["y", "z", "y"], ["train", "val", "train"])
    out = incremental.combine(old, new)
    assert out.n_split_conflicts_fixed == 2  # c and the duplicate b follow item y to test
    assert list(out.manifest["image_id"]) == ["a", "b", "c", "d"]
    assert out.manifest.set_index("image_id").loc["c", "split"] == "test"
    assert out.manifest.set_index("image_id").loc["b", "split"] == "test"  # old row kept
    metrics = out.metrics(len(old))
    assert metrics["n_new"] == 3 and metrics["n_images"] == 4 and metrics["n_new_test"] == 2


def test_new_test_rows_are_the_test_images_of_items_with_new_test_images() -> None:
    old = _rows(["a", "b", "e"], ["x", "y", "y"], ["train", "test", "test"])
    new = _rows(["c"], ["y"], ["test"])
    combined = incremental.combine(old, new).manifest
    rows, items = incremental.new_test_rows(combined, new)
    assert items == {"y"}
    assert sorted(rows["image_id"]) == ["b", "c", "e"]


def test_merge_embeddings_reuses_old_vectors_and_replaces_re_embedded_ones() -> None:
    old_ids, old_emb = np.array(["a", "b"]), np.eye(2, dtype=np.float64)
    new_ids, new_emb = np.array(["b", "c"]), np.full((2, 2), 0.5, dtype=np.float32)
    ids, emb, n_reused = incremental.merge_embeddings(old_ids, old_emb, new_ids, new_emb)
    assert list(ids) == ["a", "b", "c"] and n_reused == 1
    assert emb.dtype == np.float32
    np.testing.assert_allclose(emb, [[1, 0], [0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="shapes"):
        incremental.merge_embeddings(old_ids, old_emb, new_ids, np.zeros((2, 3)))


def test_trainset_is_new_train_plus_seeded_replay_plus_val() -> None:
    ids = [f"i{k}" for k in range(10)]
    items = [f"t{k // 2}" for k in range(10)]
    splits = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    combined = _rows(ids, items, splits)
    cfg = incremental.ReplayConfig(fraction=1.0, max_images=5, same_items=False, seed=3)
    picked = incremental.trainset(combined, {"i0", "i8"}, cfg)
    assert picked is not None
    rows, counts = picked
    assert counts == {"n_train_new": 1, "n_train_replay": 1, "n_val": 2}
    chosen = set(combined.loc[rows, "image_id"])
    assert {"i0", "i6", "i7"} <= chosen and not chosen & {"i8", "i9"}
    again = incremental.trainset(combined, {"i0", "i8"}, cfg)
    assert again is not None and again[0].equals(rows)  # seeded: the same replay


def test_trainset_without_new_train_images_is_none() -> None:
    combined = _rows(["a", "b"], ["x", "y"], ["val", "test"])
    assert incremental.trainset(combined, {"b"}, incremental.ReplayConfig()) is None


def test_replay_config_refuses_a_negative_fraction() -> None:
    with pytest.raises(ConfigError):
        incremental.ReplayConfig(fraction=-1.0)
