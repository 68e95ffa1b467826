"""Categorisation: planted clusters are recovered, names come from their documented sources,
c-TF-IDF and purity match naive references, and the step runs on a tiny MLflow store."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from imgsearch.categorize.clusters import ClusterConfig, cluster, merge
from imgsearch.categorize.collection import CategorizeConfig, categorize, purity
from imgsearch.categorize.gallery import gallery_html
from imgsearch.categorize.naming import ClassTfidf, group_keywords, label_votes, name_groups
from imgsearch.embed.files import save_embeddings
from imgsearch.errors import ConfigError
from steps.artifacts import local_artifact


def planted(
    n_super: int = 3, per_super: int = 4, per_cluster: int = 30, dim: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clusters nested in super-groups: a cluster centre is its super-group's centre plus an
    offset; points are a centre plus small noise. Returns (emb, cluster, super-group)."""
    rng = np.random.default_rng(seed)
    emb, fine, top = [], [], []
    for s in range(n_super):
        base = rng.standard_normal(dim) * 3
        for c in range(per_super):
            centre = base + rng.standard_normal(dim)
            emb.append(centre + 0.15 * rng.standard_normal((per_cluster, dim)))
            fine += [s * per_super + c] * per_cluster
            top += [s] * per_cluster
    return np.vstack(emb).astype(np.float32), np.asarray(fine), np.asarray(top)


def ids_for(n: int) -> list[str]:
    return [f"img{i:04d}" for i in range(n)]


def test_clustering_recovers_planted_clusters_and_their_tree() -> None:
    emb, fine, top = planted()
    res = cluster(ids_for(len(emb)), emb, ClusterConfig(k=12, n_categories=3, nredo=3))
    a = res.assignments
    assert adjusted_rand_score(fine, a["cluster_id"]) > 0.9
    assert adjusted_rand_score(top, a["category_id"]) > 0.9
    assert a["confidence"].between(0, 1).all() and a["distance"].between(0, 2).all()
    assert np.allclose(np.linalg.norm(res.centroids, axis=1), 1, atol=1e-5)
    # a cluster's parent is the category its members get
    assert (res.parent[a["cluster_id"]] == a["category_id"]).all()
    # random vectors (planted points shuffled) give a much lower ARI: the test can fail
    shuffled = np.random.default_rng(1).permutation(fine)
    assert adjusted_rand_score(shuffled, a["cluster_id"]) < 0.1


def test_outliers_are_flagged_and_far_points_have_low_confidence() -> None:
    emb, _, _ = planted(n_super=2, per_super=2)
    rng = np.random.default_rng(5)
    far = rng.standard_normal((4, emb.shape[1])).astype(np.float32) * 3
    # k-means++ may give the far points a centroid of their own: too small a cluster to count
    cfg = ClusterConfig(k=4, nredo=3, min_cluster_size=5)
    res = cluster(ids_for(len(emb) + 4), np.vstack([emb, far]), cfg)
    a = res.assignments
    assert a["outlier"].iloc[-4:].all()
    assert a["outlier"].iloc[:-4].mean() < 0.05
    assert a["confidence"].iloc[-4:].mean() < a["confidence"].iloc[:-4].mean()


def test_k_is_chosen_by_silhouette_when_not_given() -> None:
    # N = 2 * 10^2, so sqrt(N / 2) = 10 = the planted number of clusters is among the candidates
    emb, fine, _ = planted(n_super=10, per_super=1, per_cluster=20, dim=16, seed=3)
    res = cluster(ids_for(len(emb)), emb, ClusterConfig(k=None, n_categories=2, nredo=2))
    assert sorted(res.k_scores) == [5, 10, 20, 40]
    assert len(res.centroids) == 10
    assert adjusted_rand_score(fine, res.assignments["cluster_id"]) > 0.9


def test_bad_inputs_raise_clear_errors() -> None:
    emb, _, _ = planted(n_super=1, per_super=2, per_cluster=5)
    with pytest.raises(ConfigError, match="k=50"):
        cluster(ids_for(len(emb)), emb, ClusterConfig(k=50))
    with pytest.raises(ValueError, match="image ids"):
        cluster(ids_for(3), emb, ClusterConfig(k=2))
    bad = emb.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cluster(ids_for(len(emb)), bad, ClusterConfig(k=2))
    assert merge(np.eye(3, dtype=np.float32), 5).tolist() == [0, 1, 2]


def naive_ctfidf(counts: np.ndarray) -> np.ndarray:
    """c-TF-IDF written out loop by loop from its definition."""
    n_classes, n_terms = counts.shape
    avg_words = sum(counts[c].sum() for c in range(n_classes)) / n_classes
    out = np.zeros((n_classes, n_terms))
    for c in range(n_classes):
        words_in_class = counts[c].sum()
        for t in range(n_terms):
            freq_t = sum(counts[j, t] for j in range(n_classes))
            if words_in_class == 0 or freq_t == 0:
                continue
            out[c, t] = counts[c, t] / words_in_class * math.log(1 + avg_words / freq_t)
    return out


def test_ctfidf_matches_the_naive_reference() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, size=(6, 11)) * (rng.random((6, 11)) < 0.6)
    counts[:, 3] = 0  # a term that never occurs
    counts[4] = 0  # a class without words
    got = ClassTfidf().fit_transform(counts).toarray()
    assert np.allclose(got, naive_ctfidf(counts))
    assert not np.allclose(got, counts / np.maximum(counts.sum(1, keepdims=True), 1))


def test_keywords_are_what_sets_a_cluster_apart() -> None:
    groups = [0, 0, 0, 1, 1, 1]
    docs = [
        ["emoji", "cat", "animal"],
        ["emoji", "cat"],
        ["emoji", "animal", "cat"],
        ["emoji", "car"],
        ["emoji", "car", "red car"],
        ["emoji", "red car"],
    ]
    kw = group_keywords(groups, docs, top=3)
    assert [w for w, _ in kw[0]][:2] == ["cat", "animal"]
    assert [w for w, _ in kw[1]][:2] == ["car", "red car"]  # a multi-word tag stays one term
    assert kw[0][-1][0] == "emoji"  # everywhere: ranked last
    assert group_keywords([0, 1], [[], []]) == {0: [], 1: []}


def test_purity_matches_a_naive_reference() -> None:
    rng = np.random.default_rng(2)
    truth = rng.choice(list("abcd"), 200)
    groups = rng.integers(0, 7, 200)
    naive = sum(Counter(truth[groups == g]).most_common(1)[0][1] for g in np.unique(groups)) / 200
    assert purity(truth, groups) == pytest.approx(naive)
    assert purity(truth, np.arange(200)) == 1.0


def test_naming_sources_labels_then_keywords_then_cluster_n() -> None:
    groups = np.array([0, 0, 0, 1, 1, 2, 2])
    labels = ["cat", "cat", "dog", None, None, None, None]
    votes = label_votes(groups, labels)
    assert votes[0].label == "cat" and votes[0].purity == pytest.approx(2 / 3)
    kw = group_keywords(groups, [["a"], ["a"], ["a"], ["car"], ["bus"], [], []])
    table = name_groups([0, 1, 2], votes, kw).set_index("group")
    assert table.loc[0, "name"] == "cat" and table.loc[0, "name_source"] == "labels"
    assert table.loc[0, "purity"] == pytest.approx(2 / 3) and table.loc[0, "n_labelled"] == 3
    assert table.loc[1, "name_source"] == "keywords" and table.loc[1, "name"] == "bus, car"
    assert table.loc[2, "name"] == "cluster 2" and table.loc[2, "name_source"] == "cluster"


def test_categorize_names_from_partial_labels_and_measures_against_truth() -> None:
    emb, fine, top = planted()
    n = len(emb)
    rng = np.random.default_rng(0)
    label = np.where(rng.random(n) < 0.3, [f"kind{c}" for c in fine], None)
    label[fine == 11] = None  # a cluster without a labelled member: its neighbours name it,
    # and the nearest labelled images are those of its super-group's other clusters (8, 9, 10)
    images = pd.DataFrame(
        {
            "image_id": ids_for(n),
            "label": label,
            "subcategory": [f"s{c}" for c in fine],
            "category": [f"c{t}" for t in top],
            "split": np.where(np.arange(n) % 5 == 0, "test", "train"),
        }
    )
    cfg = CategorizeConfig(
        clusters=ClusterConfig(k=12, n_categories=3, nredo=3), label_column="label"
    )
    out = categorize(images["image_id"], emb, images, {"en": [["w"]] * n}, cfg)
    fine_rows = out.categories[out.categories["level"] == "cluster"]
    assert len(fine_rows) == 12 and (out.categories["level"] == "category").sum() == 3
    by_source = fine_rows.set_index("name_source")
    assert set(fine_rows["name_source"]) == {"labels", "label_neighbours"}
    assert by_source.loc["label_neighbours", "name"] in {"kind8", "kind9", "kind10"}
    assert (by_source.loc["labels", "purity"] > 0.9).all()
    m = out.metrics
    assert m["cluster_subcategory_ari"] > 0.9 and m["category_category_ari"] > 0.9
    assert m["cluster_subcategory_purity"] > 0.9 and "test_cluster_subcategory_nmi" in m
    assert out.assignments["name"].notna().all()
    assert fine_rows["representatives"].str.count(";").eq(7).all()
    with pytest.raises(ConfigError, match="label_column 'tag'"):
        categorize(images["image_id"], emb, images, None, CategorizeConfig(label_column="tag"))


def write_png(path: Path, colour: tuple[int, int, int]) -> str:
    Image.new("RGB", (32, 32), colour).save(path)
    return str(path)


def test_gallery_is_self_contained(tmp_path: Path) -> None:
    cats = pd.DataFrame(
        [
            {"level": "category", "cluster_id": 0, "parent": -1, "name": "animals <b>",
             "name_source": "keywords", "keywords": "cat;dog", "size": 2, "cohesion": 0.9,
             "purity": np.nan, "representatives": "a;b"},
            {"level": "cluster", "cluster_id": 0, "parent": 0, "name": "cats",
             "name_source": "labels", "keywords": "cat", "size": 2, "cohesion": 0.9,
             "purity": 1.0, "representatives": "a;missing"},
        ]
    )  # fmt: skip
    page = gallery_html(cats, {"a": write_png(tmp_path / "a.png", (200, 10, 10))})
    assert "animals &lt;b&gt;" in page and "cat, dog" in page and "purity 1.00" in page
    assert page.count("data:image/webp;base64,") == 1 and "missing" in page
    assert "http" not in page


def test_step_runs_on_a_tiny_store(mlflow_store: str, tmp_path: Path) -> None:
    from steps import categorize as step

    emb, fine, top = planted(n_super=2, per_super=3, per_cluster=8)
    n = len(emb)
    ids = ids_for(n)
    items = [f"item{i // 2}" for i in range(n)]  # two images per item
    pics = tmp_path / "pics"
    pics.mkdir()
    manifest = pd.DataFrame(
        {
            "image_id": ids,
            "item_id": items,
            "path": [
                write_png(pics / f"{i}.png", (20 * (c % 10), 9, 9))
                for i, c in zip(ids, fine, strict=True)
            ],
            "subcategory": [f"s{c}" for c in fine],
            "category": [f"c{t}" for t in top],
            "split": np.where(np.arange(n) % 4 == 0, "test", "train"),
        }
    )
    tags = pd.DataFrame(
        [
            {"item_id": it, "lang": "en", "kind": "tag", "text": word}
            for it, c in dict(zip(items, fine, strict=True)).items()
            for word in (f"shape{c}", f"group{c // 3}", "thing")
        ]
    )
    with mlflow.start_run(run_name="extract") as ex:
        save_embeddings(tmp_path / "embeddings.parquet", ids, emb)
        mlflow.log_artifact(str(tmp_path / "embeddings.parquet"))
        manifest.to_parquet(tmp_path / "manifest.parquet")
        mlflow.log_artifact(str(tmp_path / "manifest.parquet"))
    with mlflow.start_run(run_name="ingest") as ing:
        tags.to_parquet(tmp_path / "texts.parquet")
        mlflow.log_artifact(str(tmp_path / "texts.parquet"))

    run_id = step.run(
        ex.info.run_id,
        texts_run_id=ing.info.run_id,
        overrides={
            "categorize.clusters.k": 6,
            "categorize.clusters.n_categories": 2,
            "categorize.clusters.nredo": 3,
            "categorize.member_texts": True,
        },
    )
    run = mlflow.get_run(run_id)
    m = run.data.metrics
    assert m["n_clusters"] == 6 and m["n_categories"] == 2
    assert m["cluster_subcategory_ari"] > 0.9 and m["category_category_nmi"] > 0.9
    # keywords from member texts: each cluster's own shape tag ranks first
    assert m["cluster_keywords_en_precision_at_5"] > 0.3
    assert m["n_named_by_keywords"] == 6
    local = local_artifact(f"runs:/{run_id}")
    cats = pd.read_parquet(local / "categories.parquet")
    fine_rows = cats[cats["level"] == "cluster"]
    assert fine_rows["keywords"].str.split(";").str[0].str.startswith("shape").all()
    assert len(pd.read_parquet(local / "assignments.parquet")) == n
    assert (local / "assignments.csv").exists() and (local / "categories.csv").exists()
    page = (local / "gallery" / "categories.html").read_text()
    assert page.count("data:image/webp;base64,") == 6 * 8
    assert run.data.tags["imgsearch.categorize.keyword_source"] == "en"


def test_keyword_sources_of_the_step_follow_embedding_order() -> None:
    from steps.categorize import _docs_from_keywords, _docs_from_texts

    zero_shot = pd.DataFrame(
        {
            "image_id": ["b", "b", "a", "a", "a"],
            "lang": ["en"] * 5,
            "rank": [2, 1, 1, 2, 3],
            "keyword": ["dog", "cat", "car", "bus", "van"],
            "score": [0.5] * 5,
        }
    )
    docs = _docs_from_keywords(zero_shot, ["a", "b", "c"], top=2)
    assert docs == {"en": [["car", "bus"], ["cat", "dog"], []]}
    texts = pd.DataFrame(
        [
            {"item_id": "i1", "lang": "ru", "kind": "tag", "text": "кот"},
            {"item_id": "i1", "lang": "ru", "kind": "label", "text": "морда кошки"},
            {"item_id": "i2", "lang": "ru", "kind": "tag", "text": "машина"},
        ]
    )
    images = pd.DataFrame({"image_id": ["x", "y", "z"], "item_id": ["i2", "i1", "i3"]})
    assert _docs_from_texts(texts, images) == {"ru": [["машина"], ["кот"], []]}
