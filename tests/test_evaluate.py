"""evaluate(): gallery protocol vs a brute-force reference, clusters vs noise, per category, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imgsearch import schema
from imgsearch.config import from_dict, load_config
from imgsearch.errors import CatalogError, ConfigError
from imgsearch.evaluate import retrieval as E
from imgsearch.evaluate.plots import embedding_plots
from imgsearch.evaluate.retrieval import (
    EvaluateConfig,
    evaluate,
    retrieval_map_at_r,
    retrieval_scores,
)

CATEGORIES = ("animals", "food", "flags")


def synthetic(
    n_items: int = 40, per_item: int = 4, dim: int = 16, noise: float = 0.05, seed: int = 0
):
    """Items as clusters around random centres; every split holds some items; ids shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_items, dim))
    rows, emb = [], []
    for i in range(n_items):
        for j in range(per_item - (i % 3 == 0 and i % 2 == 0)):  # some items have fewer images
            rows.append(
                {
                    schema.IMAGE_ID: f"im{i:03d}_{j}",
                    schema.ITEM_ID: f"it{i:03d}",
                    schema.CATEGORY: CATEGORIES[i % 3],
                    schema.SPLIT: schema.SPLITS[i % 3] if i % 5 else "test",
                }
            )
            emb.append(centres[i] + noise * rng.normal(size=dim))
    manifest = pd.DataFrame(rows)
    order = rng.permutation(len(manifest))
    ids = manifest[schema.IMAGE_ID].to_numpy()[order]
    return ids, np.asarray(emb, dtype=np.float32)[order], manifest


def reference(ids, emb, manifest, split, ks):
    """Brute force: full similarity, python sort with ties by image_id, metrics by loops."""
    rows = manifest[manifest[schema.SPLIT] == split].sort_values(schema.IMAGE_ID)
    lookup = {i: e / np.linalg.norm(e) for i, e in zip(ids, emb, strict=True)}
    rows = rows[rows[schema.IMAGE_ID].isin(lookup)]
    out = {}
    for q in rows.itertuples():
        others = [r for r in rows.itertuples() if r.image_id != q.image_id]
        ranked = sorted(
            others, key=lambda r: (-float(lookup[q.image_id] @ lookup[r.image_id]), r.image_id)
        )
        rel = [r.item_id == q.item_id for r in ranked]
        n_rel = sum(rel)
        if n_rel == 0:
            out[q.image_id] = None
            continue
        res = {}
        for k in ks:
            res[f"hit_at_{k}"] = float(any(rel[:k]))
            res[f"precision_at_{k}"] = sum(rel[:k]) / k
            res[f"recall_at_{k}"] = sum(rel[:k]) / n_rel
        prec = [sum(rel[: i + 1]) / (i + 1) for i in range(len(rel))]
        res["ap"] = sum(p for p, r in zip(prec, rel, strict=True) if r) / n_rel
        res["ap_at_r"] = sum(p for p, r in zip(prec[:n_rel], rel[:n_rel], strict=True) if r) / n_rel
        out[q.image_id] = res
    return out


@pytest.mark.parametrize("noise", [0.05, 3.0])
def test_evaluate_matches_brute_force_reference(noise: float, monkeypatch) -> None:
    monkeypatch.setattr(
        E, "_BLOCK_BYTES", 13 * 40 * 7
    )  # blocks of 7 queries: exercise the blocking
    ids, emb, manifest = synthetic(noise=noise)
    # exact duplicate embeddings make ties: broken by image_id in both
    emb[ids == "im010_0"] = emb[ids == "im005_1"]
    cfg = EvaluateConfig(ks=(1, 2, 5), feature_quality=False)
    result = evaluate(ids, emb, manifest, cfg)
    ref = reference(ids, emb, manifest, "test", cfg.ks)
    pq = result.per_query.set_index(schema.IMAGE_ID)
    assert set(pq.index) == set(ref)
    for image_id, values in ref.items():
        if values is None:
            assert pq.loc[image_id, "n_relevant"] == 0 and np.isnan(pq.loc[image_id, "ap"])
            continue
        for key, value in values.items():
            assert pq.loc[image_id, key] == pytest.approx(value), (image_id, key)
    valid = [v for v in ref.values() if v is not None]
    assert result.metrics["n_queries"] == len(valid)
    assert result.metrics["n_queries_without_relevant"] == len(ref) - len(valid)
    assert result.metrics["map"] == pytest.approx(np.mean([v["ap"] for v in valid]))
    assert result.metrics["map_at_r"] == pytest.approx(np.mean([v["ap_at_r"] for v in valid]))


def test_tight_clusters_score_near_one_and_noise_near_chance() -> None:
    ids, emb, manifest = synthetic(n_items=60, noise=0.05)
    good = evaluate(ids, emb, manifest, EvaluateConfig()).metrics
    for key in ("hit_at_1", "map", "map_at_r", "recall_at_10", "fq_nmi"):
        assert good[key] > 0.95, key
    rng = np.random.default_rng(1)
    bad = evaluate(
        ids, rng.normal(size=emb.shape).astype(np.float32), manifest, EvaluateConfig()
    ).metrics
    # chance hit@1 ~ 3 relevant / ~90 gallery images
    assert bad["hit_at_1"] < 0.15 and bad["map"] < 0.15 and bad["map_at_r"] < 0.1
    assert bad["fq_ratio"] > 0.9 > good["fq_ratio"]
    names = {
        "hit_at_1",
        "hit_at_5",
        "hit_at_10",
        "precision_at_5",
        "recall_at_10",
        "map",
        "map_at_r",
        "n_queries",
    }
    names |= {
        "fq_intra_dist",
        "fq_inter_dist",
        "fq_ratio",
        "fq_nmi",
        "fq_ari",
        "fq_silhouette",
        "fq_embedding_std",
    }
    assert names <= set(good)


def test_per_category_and_per_query_tables() -> None:
    ids, emb, manifest = synthetic()
    result = evaluate(ids, emb, manifest, EvaluateConfig(feature_quality=False))
    pc = result.per_category.set_index(schema.CATEGORY)
    assert set(pc.index) == set(result.per_query[schema.CATEGORY])
    assert pc["n_queries"].sum() == result.metrics["n_queries"]
    pq = result.per_query
    for category, row in pc.iterrows():
        part = pq[(pq[schema.CATEGORY] == category) & (pq["n_relevant"] > 0)]
        assert row["map"] == pytest.approx(part["ap"].mean())
        assert row["hit_at_1"] == pytest.approx(part["hit_at_1"].mean())
    assert (pq["top1_image_id"] != pq[schema.IMAGE_ID]).all()
    hit = pq["n_relevant"] > 0
    assert ((pq.loc[hit, "first_relevant_rank"] == 1) == (pq.loc[hit, "hit_at_1"] == 1)).all()
    assert ((pq["top1_item_id"] == pq[schema.ITEM_ID]) == (pq["hit_at_1"] == 1)).all()


def test_only_the_chosen_split_and_missing_embeddings_counted() -> None:
    ids, emb, manifest = synthetic()
    keep = ids != "im000_0"  # a test image without embedding
    result = evaluate(
        ids[keep], emb[keep], manifest, EvaluateConfig(split="val", feature_quality=False)
    )
    val_ids = set(manifest.loc[manifest[schema.SPLIT] == "val", schema.IMAGE_ID])
    assert set(result.per_query[schema.IMAGE_ID]) == val_ids
    assert (
        result.metrics["n_gallery"] == len(val_ids) and result.metrics["n_missing_embeddings"] == 0
    )
    test = evaluate(ids[keep], emb[keep], manifest, EvaluateConfig(feature_quality=False))
    assert test.metrics["n_missing_embeddings"] == 1


def test_max_queries_samples_queries_against_the_full_gallery() -> None:
    ids, emb, manifest = synthetic(noise=1.0)
    full = evaluate(ids, emb, manifest, EvaluateConfig(feature_quality=False)).per_query
    some = evaluate(
        ids, emb, manifest, EvaluateConfig(feature_quality=False, max_queries=10)
    ).per_query
    assert len(some) == 10
    merged = some.merge(full, on=schema.IMAGE_ID, suffixes=("", "_full"))
    np.testing.assert_allclose(merged["ap"], merged["ap_full"])


def test_fast_helper_matches_evaluate() -> None:
    ids, emb, manifest = synthetic(noise=1.5)
    result = evaluate(
        ids, emb, manifest, EvaluateConfig(split="all", feature_quality=False, by_category=False)
    )
    ordered = manifest.set_index(schema.IMAGE_ID).loc[ids, schema.ITEM_ID].to_numpy()
    fast = retrieval_scores(emb, ordered, ks=(1, 5))
    for key in ("map_at_r", "hit_at_1", "hit_at_5", "recall_at_5", "r_precision", "n_queries"):
        assert fast[key] == pytest.approx(result.metrics[key]), key
    assert "map" not in fast
    assert retrieval_map_at_r(emb, ordered) == pytest.approx(result.metrics["map_at_r"])
    assert result.per_category.empty


def test_bad_inputs_raise() -> None:
    ids, emb, manifest = synthetic()
    with pytest.raises(CatalogError):
        evaluate(ids, emb, manifest.drop(columns=schema.SPLIT), EvaluateConfig())
    with pytest.raises(CatalogError):
        evaluate(
            np.concatenate([ids, ids[:1]]),
            np.concatenate([emb, emb[:1]]),
            manifest,
            EvaluateConfig(),
        )
    with pytest.raises(CatalogError):
        evaluate(ids[:1], emb[:1], manifest, EvaluateConfig())
    nan = emb.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError):
        evaluate(ids, nan, manifest, EvaluateConfig())
    with pytest.raises(ConfigError):
        from_dict(EvaluateConfig, {"split": "tset"})
    with pytest.raises(ConfigError):
        from_dict(EvaluateConfig, {"ks": [0, 5]})


def test_yaml_defaults_build_the_config() -> None:
    cfg = from_dict(EvaluateConfig, load_config()["evaluate"])
    assert cfg.ks == (1, 5, 10) and cfg.split == "test"


def test_tsne_plot_written(tmp_path: Path) -> None:
    _, emb, manifest = synthetic(n_items=15)
    paths = embedding_plots(
        emb, manifest[schema.CATEGORY], tmp_path, max_points=40, methods=("tsne",)
    )
    assert [p.name for p in paths] == ["embeddings_tsne.png"]
    assert paths[0].stat().st_size > 1000 and paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_umap_plot_written(tmp_path: Path) -> None:
    _, emb, manifest = synthetic(n_items=15)
    paths = embedding_plots(emb, manifest[schema.CATEGORY], tmp_path, methods=("umap",))
    assert paths[0].name == "embeddings_umap.png" and paths[0].stat().st_size > 1000
