"""Split properties: items never straddle splits, fractions, determinism, frozen under growth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from imgsearch import schema
from imgsearch.config import from_dict
from imgsearch.data.split import SplitConfig, split
from imgsearch.errors import CatalogError, ConfigError


def make_manifest(n_items: int, seed: int = 0, prefix: str = "item") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_items):
        for j in range(int(rng.integers(1, 5))):
            rows.append(
                {
                    schema.IMAGE_ID: f"{prefix}{i}-img{j}",
                    schema.ITEM_ID: f"{prefix}{i}",
                    schema.URI: f"{prefix}{i}/{j}.png",
                    schema.CATEGORY: ["animals", "food", "flags", None][i % 4],
                }
            )
    return pd.DataFrame(rows)


def assignment(df: pd.DataFrame) -> dict[str, str]:
    return dict(zip(df[schema.IMAGE_ID], df[schema.SPLIT], strict=True))


def test_by_item_keeps_items_whole_and_fractions_close() -> None:
    manifest = make_manifest(3000)
    out, metrics = split(manifest, SplitConfig())
    assert set(out[schema.SPLIT]) == set(schema.SPLITS)
    assert (out.groupby(schema.ITEM_ID)[schema.SPLIT].nunique() == 1).all()
    assert metrics["n_items_in_several_splits"] == 0
    # binomial noise with 3000 items: sd ~ 0.009; 0.04 is > 4 sd
    for name, f in zip(schema.SPLITS, (0.7, 0.1, 0.2), strict=True):
        assert abs(metrics[f"frac_items_{name}"] - f) < 0.04
    assert sum(metrics[f"n_images_{s}"] for s in schema.SPLITS) == len(manifest)
    sizes = out[out[schema.SPLIT] == "test"].groupby(schema.ITEM_ID).size()
    assert metrics["n_test_items_with_2plus_images"] == int((sizes >= 2).sum())
    assert metrics["n_test_queries"] == int(sizes[sizes >= 2].sum())
    assert (
        0 < metrics["n_test_items_with_2plus_images"] < metrics["n_items_test"]
    )  # singletons kept
    assert out.drop(columns=schema.SPLIT).equals(manifest)  # nothing else changed
    assert schema.SPLIT not in manifest.columns  # input untouched


def test_moving_the_train_val_cut_leaves_test_alone() -> None:
    # the test items are those hashing past train + val: re-cutting train/val (60/20/20 -> 70/10/20)
    # moves items only from val to train, so a baseline measured before stays comparable
    manifest = make_manifest(1000)
    before, _ = split(manifest, SplitConfig(fractions=(0.6, 0.2, 0.2)))
    after, _ = split(manifest, SplitConfig(fractions=(0.7, 0.1, 0.2)))
    old, new = assignment(before), assignment(after)
    assert {k for k, v in old.items() if v == "test"} == {k for k, v in new.items() if v == "test"}
    moved = {(old[k], new[k]) for k in old if old[k] != new[k]}
    assert moved == {("val", "train")}


def test_by_image_assigns_images_independently() -> None:
    manifest = make_manifest(800)
    out, metrics = split(manifest, SplitConfig(by="image"))
    assert metrics["n_items_in_several_splits"] > 0
    for name, f in zip(schema.SPLITS, (0.7, 0.1, 0.2), strict=True):
        assert abs(metrics[f"frac_images_{name}"] - f) < 0.05


def test_deterministic_and_seed_dependent() -> None:
    manifest = make_manifest(300)
    a, _ = split(manifest, SplitConfig(seed=3))
    b, _ = split(manifest, SplitConfig(seed=3))
    c, _ = split(manifest, SplitConfig(seed=4))
    assert assignment(a) == assignment(b)
    assert assignment(a) != assignment(c)


@pytest.mark.parametrize(
    "cfg", [SplitConfig(), SplitConfig(by="image"), SplitConfig(stratify_by="category")]
)
def test_stable_under_row_reordering(cfg: SplitConfig) -> None:
    manifest = make_manifest(300)
    shuffled = manifest.sample(frac=1.0, random_state=7).reset_index(drop=True)
    assert assignment(split(manifest, cfg)[0]) == assignment(split(shuffled, cfg)[0])


def test_frozen_when_items_are_added() -> None:
    old = make_manifest(400)
    new = pd.concat([old, make_manifest(200, seed=1, prefix="new")], ignore_index=True)
    before = assignment(split(old, SplitConfig(seed=11))[0])
    after = assignment(split(new.sample(frac=1.0, random_state=0), SplitConfig(seed=11))[0])
    assert {k: after[k] for k in before} == before


def test_stratified_fractions_per_category() -> None:
    manifest = make_manifest(400)
    out, _ = split(manifest, SplitConfig(stratify_by="category"))
    assert (out.groupby(schema.ITEM_ID)[schema.SPLIT].nunique() == 1).all()
    items = out.drop_duplicates(schema.ITEM_ID).fillna({schema.CATEGORY: "<NA>"})
    for _, group in items.groupby(schema.CATEGORY):
        counts = group[schema.SPLIT].value_counts()
        n = len(group)  # 100 items per category: quotas are exact
        assert counts.get("train", 0) == round(0.7 * n) and counts.get("test", 0) == round(0.2 * n)


def test_zero_fraction_gives_empty_split() -> None:
    out, metrics = split(make_manifest(200), SplitConfig(fractions=(0.7, 0.3, 0.0)))
    assert metrics["n_images_test"] == 0 and "test" not in set(out[schema.SPLIT])


@pytest.mark.parametrize(
    "data",
    [
        {"fractions": [0.5, 0.5, 0.5]},
        {"fractions": [1.2, -0.1, -0.1]},
        {"fractions": [0.5, 0.5]},
        {"by": "user"},
        {"by": "image", "stratify_by": "category"},
        {"seeds": 1},
    ],
)
def test_bad_config_raises(data: dict) -> None:
    with pytest.raises(ConfigError):
        from_dict(SplitConfig, data)


def test_yaml_defaults_build_the_config() -> None:
    from imgsearch.config import load_config

    cfg = from_dict(SplitConfig, load_config()["split"])
    assert cfg.by == "item" and cfg.fractions == pytest.approx((0.7, 0.1, 0.2))


def test_bad_manifest_raises() -> None:
    manifest = make_manifest(10)
    with pytest.raises(CatalogError):
        split(pd.concat([manifest, manifest.iloc[:1]]), SplitConfig())
    with pytest.raises(CatalogError):
        split(manifest.drop(columns=schema.ITEM_ID), SplitConfig())
    with pytest.raises(ConfigError):
        split(manifest, SplitConfig(stratify_by="no_such_column"))


def test_empty_manifest() -> None:
    out, metrics = split(
        make_manifest(0).reindex(columns=[schema.IMAGE_ID, schema.ITEM_ID]), SplitConfig()
    )
    assert schema.SPLIT in out.columns and metrics["n_images"] == 0
