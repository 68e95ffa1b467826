"""Tests of imgsearch.search.ranking: popularity, filters, MMR, one image per item, tuning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from imgsearch import schema
from imgsearch.errors import ConfigError
from imgsearch.evaluate.metrics import average_precision_at_k
from imgsearch.search.factory import IndexConfig
from imgsearch.search.index import ImageIndex
from imgsearch.search.ranking import RankingConfig, RankingTable, popularity, rank
from imgsearch.search.rerank import mmr
from imgsearch.search.tuning import tune

D = 16


def unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def catalog(n: int = 200, with_popularity: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    meta = pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(n)],
            "item_id": [f"item{i // 4}" for i in range(n)],  # 4 images per item
            "category": [["cats", "dogs", "birds"][i % 3] for i in range(n)],
            "nsfw": [i % 5 == 0 for i in range(n)],
            "vendor": [f"v{i % 2}" for i in range(n)],
        }
    )
    if with_popularity:
        downloads = rng.integers(0, 10_000, n).astype(float)
        downloads[::7] = np.nan
        meta["downloads"] = downloads
        meta["likes"] = rng.integers(0, 500, n)
    return meta


def make_index(
    meta: pd.DataFrame, emb: np.ndarray | None = None, factory: str = "Flat"
) -> ImageIndex:
    emb = unit(len(meta)) if emb is None else emb
    return ImageIndex.build(emb, meta, IndexConfig(factory=factory), "fp")


def brute(index: ImageIndex, q: np.ndarray, rows: np.ndarray) -> list[str]:
    """Image ids of ``rows`` by descending exact cosine with ``q``."""
    emb = index.vectors(rows)
    order = np.argsort(-(emb @ q), kind="stable")
    return index.meta["image_id"].to_numpy()[rows[order]].tolist()


# --- popularity ---------------------------------------------------------------------------------
def test_popularity_values_against_hand_computation() -> None:
    meta = pd.DataFrame({"downloads": [0, 9, 99, np.nan], "likes": [np.nan] * 4})
    # log1p -> [0, ln 10, ln 100, nan] -> min-max [0, .5, 1, nan->0]; likes all-NaN: left out
    np.testing.assert_allclose(popularity(meta), [0.0, 0.5, 1.0, 0.0])
    both = pd.DataFrame({"downloads": [0, 9, 99], "likes": [3, 3, 0]})
    np.testing.assert_allclose(popularity(both), [(0 + 1) / 2, (0.5 + 1) / 2, (1 + 0) / 2])
    assert not popularity(pd.DataFrame({"x": [1, 2]})).any()
    assert not popularity(pd.DataFrame({"downloads": [5, 5]})).any()  # constant: no signal


def test_no_popularity_columns_reduces_to_similarity_exactly() -> None:
    meta = catalog(with_popularity=False)
    index = make_index(meta)
    q = unit(1, seed=5)[0]
    hits = rank(index, q, 10, RankingConfig(popularity_weight=0.7))
    np.testing.assert_array_equal(hits["score"].to_numpy(), hits["similarity"].to_numpy())
    assert (hits["popularity"] == 0).all()
    assert hits["image_id"].tolist() == brute(index, q, np.arange(len(meta)))[:10]


def test_popularity_weight_reorders() -> None:
    meta = catalog()
    index = make_index(meta)
    q = unit(1, seed=6)[0]
    plain = rank(index, q, 10, RankingConfig())
    boosted = rank(index, q, 10, RankingConfig(popularity_weight=5.0, candidates=50))
    np.testing.assert_allclose(
        boosted["score"], boosted["similarity"] + 5.0 * boosted["popularity"], rtol=1e-12
    )
    assert (np.diff(boosted["score"].to_numpy()) <= 0).all()
    assert boosted["image_id"].tolist() != plain["image_id"].tolist()
    assert boosted["popularity"].mean() > plain["popularity"].mean()


# --- output shape -------------------------------------------------------------------------------
def test_output_columns_single_and_batch() -> None:
    meta = catalog()
    index = make_index(meta)
    one = rank(index, unit(1, seed=2)[0], 5)
    assert list(one.columns[:5]) == ["image_id", "item_id", "score", "similarity", "popularity"]
    assert {"category", "vendor", "nsfw"} <= set(one.columns) and len(one) == 5
    many = rank(index, unit(3, seed=2), 5)
    assert list(many.columns[:2]) == ["query", "rank"] and len(many) == 15
    assert many.groupby("query")["rank"].apply(list).tolist() == [[1, 2, 3, 4, 5]] * 3
    pd.testing.assert_frame_equal(
        many[many["query"] == 0].drop(columns=["query", "rank"]).reset_index(drop=True), one
    )


# --- filters ------------------------------------------------------------------------------------
def test_category_and_nsfw_filters() -> None:
    meta = catalog()
    index = make_index(meta)
    q = unit(1, seed=3)[0]
    hits = rank(index, q, 8, RankingConfig(categories=["dogs"], exclude_nsfw=True))
    assert len(hits) == 8 and set(hits["category"]) == {"dogs"} and not hits["nsfw"].any()
    allowed = np.flatnonzero((meta["category"] == "dogs") & ~meta["nsfw"])
    assert hits["image_id"].tolist() == brute(index, q, allowed)[:8]
    with pytest.raises(ConfigError, match="genre"):
        rank(index, q, 3, RankingConfig(categories=["x"], category_column="genre"))


def test_nsfw_unknown_values_are_kept() -> None:
    meta = catalog(20)
    meta["nsfw"] = pd.array([True, None, "false", "yes", 0] * 4, dtype=object)
    index = make_index(meta)
    hits = rank(index, unit(1, seed=1)[0], 20, RankingConfig(exclude_nsfw=True))
    assert sorted(hits["image_id"]) == sorted(
        meta["image_id"][[i for i in range(20) if i % 5 in (1, 2, 4)]]
    )


def test_flags_parse_strictly_with_documented_spellings() -> None:
    """One flag parser (schema.parse_flags) for EDA and ranking: unknown stays unknown (NA);
    ranking's exclude_nsfw keeps unknown rows."""
    values = pd.Series([True, False, 1, 0, 2.5, " Yes ", "n", "T", "0", "maybe", None, np.nan, [1]])
    got = schema.parse_flags(values)
    assert str(got.dtype) == "boolean"
    expected = [True, False, True, False, True, True, False, True, False, None, None, None, None]
    assert [None if pd.isna(v) else bool(v) for v in got] == expected


def test_table_held_by_the_caller_gives_the_same_ranking() -> None:
    meta = catalog()
    index = make_index(meta)
    q = unit(3, seed=4)
    cfg = RankingConfig(popularity_weight=0.1, exclude_nsfw=True, categories=["dogs", "cats"])
    table = RankingTable.from_index(index)
    pd.testing.assert_frame_equal(rank(index, q, 7, cfg, table=table), rank(index, q, 7, cfg))
    other = make_index(catalog(n=10))
    with pytest.raises(ValueError, match="another index state"):
        rank(other, q, 3, cfg, table=table)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_selective_filter_fetches_more_candidates(factory: str) -> None:
    meta = catalog(400)
    meta["category"] = "common"
    rare = [13, 201, 377]
    meta.loc[rare, "category"] = "rare"
    index = make_index(meta, factory=factory)
    index.set_search_params(nprobe=1)  # an IVF probing one cell cannot reach every rare row
    q = unit(1, seed=8)[0]
    hits = rank(index, q, 5, RankingConfig(categories=["rare"], candidates=4))
    assert sorted(hits["image_id"]) == sorted(f"img{i}" for i in rare)  # all 3, no more
    assert hits["image_id"].tolist() == brute(index, q, np.array(rare))
    np.testing.assert_allclose(
        hits["similarity"], np.sort(index.vectors(np.array(rare)) @ q)[::-1], atol=1e-5
    )


def test_exclude_ids_global_and_per_query() -> None:
    meta = catalog()
    emb = unit(len(meta))
    index = make_index(meta, emb)
    top = rank(index, emb[10], 3)
    assert top["image_id"].iloc[0] == "img10"
    without = rank(index, emb[10], 3, exclude_ids=["img10"])
    assert (
        "img10" not in set(without["image_id"])
        and without["image_id"].iloc[0] == top["image_id"].iloc[1]
    )
    per = rank(index, emb[[10, 20]], 2, exclude_ids=[["img10"], ["img20"]])
    assert "img10" not in set(per[per["query"] == 0]["image_id"])
    assert "img20" not in set(per[per["query"] == 1]["image_id"])
    with pytest.raises(ValueError):
        rank(index, emb[[10, 20]], 2, exclude_ids=[["img10"]])


def test_one_per_item_keeps_best_image_of_each_item() -> None:
    meta = catalog()
    emb = unit(len(meta))
    # make each item's 4 images near duplicates so plain search returns whole items
    emb = emb[(np.arange(len(meta)) // 4) * 4] + 0.05 * unit(len(meta), seed=9)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    index = make_index(meta, emb)
    q = emb[0]
    plain = rank(index, q, 8)
    assert plain["item_id"].duplicated().any()
    hits = rank(index, q, 8, RankingConfig(one_per_item=True, candidates=10))
    assert len(hits) == 8 and not hits["item_id"].duplicated().any()
    for _, row in hits.iterrows():
        rows = np.flatnonzero(meta["item_id"] == row["item_id"])
        assert row["image_id"] == brute(index, q, rows)[0]


# --- MMR ----------------------------------------------------------------------------------------
def mmr_reference(rel: np.ndarray, vec: np.ndarray, k: int, lam: float) -> list[int]:
    """Carbonell & Goldstein's greedy MMR, written out literally."""
    selected: list[int] = []
    remaining = list(range(len(rel)))
    while remaining and len(selected) < k:
        best, best_value = None, None
        for i in remaining:
            diversity = max(float(np.dot(vec[i], vec[s])) for s in selected) if selected else 0.0
            value = lam * rel[i] - (1 - lam) * diversity
            if best_value is None or value > best_value:
                best, best_value = i, value
        assert best is not None
        selected.append(best)
        remaining.remove(best)
    return selected


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mmr_matches_reference(lam: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vec = unit(40, 8, seed=seed + 10).astype(np.float64)
    rel = rng.random(40)
    assert mmr(rel, vec, 12, lam).tolist() == mmr_reference(rel, vec, 12, lam)
    assert mmr(rel, vec, 100, lam).tolist() == mmr_reference(rel, vec, 100, lam)


def test_mmr_in_rank_diversifies_and_lambda_one_is_plain() -> None:
    meta = catalog(120, with_popularity=False)
    base = unit(30, seed=4)
    emb = base[np.arange(120) // 4] + 0.02 * unit(120, seed=5)  # 30 groups of near duplicates
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    index = make_index(meta, emb)
    q = emb[0]
    plain = rank(index, q, 6, RankingConfig(candidates=50))
    same = rank(index, q, 6, RankingConfig(candidates=50, mmr_lambda=1.0))
    pd.testing.assert_frame_equal(plain, same)
    diverse = rank(index, q, 6, RankingConfig(candidates=50, mmr_lambda=0.5))
    assert diverse["image_id"].iloc[0] == plain["image_id"].iloc[0]
    assert diverse["item_id"].nunique() > plain["item_id"].nunique()
    # the same picks as the reference on the candidate pool
    pool = rank(index, q, 50, RankingConfig(candidates=50))
    assert len(pool) == 50
    position = {image_id: i for i, image_id in enumerate(meta["image_id"])}
    vec = index.vectors(np.array([position[i] for i in pool["image_id"]]))
    ref = mmr_reference(pool["score"].to_numpy(), vec.astype(np.float64), 6, 0.5)
    assert diverse["image_id"].tolist() == pool["image_id"].to_numpy()[ref].tolist()


# --- tuning -------------------------------------------------------------------------------------
def test_average_precision_against_sklearn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(30) < 0.3
        if not y.any():
            continue
        scores = rng.random(30)
        ranked = y[np.argsort(-scores)]
        assert average_precision_at_k(ranked, int(y.sum())) == pytest.approx(
            average_precision_score(y, scores)
        )
    # truncated list: denominator min(R, k)
    assert average_precision_at_k(np.array([False, True]), 5) == pytest.approx(0.5 / 2)
    assert average_precision_at_k(np.array([], dtype=bool), 2) == 0.0


def tune_case() -> tuple[ImageIndex, np.ndarray, list[str], list[str]]:
    """4 query items; each has a relevant image (cos .80, mid popularity), a close distractor
    (cos .85, unpopular) and a far popular distractor (cos .65). Weight 0.1 puts the relevant
    image first; 0 leaves the close distractor first; 0.5 lets the far popular one overtake."""
    n_q, dim = 4, 4 + 4 * 3
    rows, emb, queries = [], [], []
    top = np.log1p(1000.0)
    for j in range(n_q):
        qv = np.zeros(dim)
        qv[j] = 1.0
        queries.append(qv)
        emb.append(qv)
        rows.append((f"q{j}", f"item{j}", 0.0))
        for slot, (cos, pop, item) in enumerate(
            [(0.80, 0.6, f"item{j}"), (0.85, 0.0, f"other{j}"), (0.65, 1.0, f"far{j}")]
        ):
            v = np.zeros(dim)
            v[j] = cos
            v[4 + 3 * j + slot] = np.sqrt(1 - cos**2)
            emb.append(v)
            rows.append((f"g{j}_{slot}", item, float(np.expm1(pop * top))))
    meta = pd.DataFrame(rows, columns=["image_id", "item_id", "downloads"])
    index = make_index(meta, np.asarray(emb, dtype=np.float32))
    q_ids = [f"q{j}" for j in range(n_q)]
    return index, np.asarray(queries, dtype=np.float32), [f"item{j}" for j in range(n_q)], q_ids


def test_tune_picks_the_right_weight() -> None:
    index, queries, items, q_ids = tune_case()
    grid = {"popularity_weight": [0.0, 0.1, 0.5]}
    best, table = tune(index, queries, items, grid, query_ids=q_ids, k=3)
    assert best.popularity_weight == 0.1
    assert table["map"].tolist() == pytest.approx([0.5, 1.0, 0.5])
    assert table["best"].tolist() == [False, True, False]
    assert (table["n_queries"] == 4).all()


def test_tune_without_popularity_collapses_to_zero() -> None:
    index, queries, items, q_ids = tune_case()
    bare = make_index(index.meta.drop(columns=["downloads"]), index.vectors(np.arange(index.count)))
    best, table = tune(
        bare, queries, items, {"popularity_weight": [0.1, 0.5]}, query_ids=q_ids, k=3
    )
    assert best.popularity_weight == 0.0 and table["popularity_weight"].tolist() == [0.0]
    assert table["map"].iloc[0] == pytest.approx(0.5)


def test_tune_query_image_is_excluded() -> None:
    index, queries, items, _ = tune_case()
    # without query ids the query image (same item, cos 1) counts as a relevant hit at rank 1:
    # relevant at ranks 1 and 3 of 2 relevant rows -> (1 + 2/3) / 2
    best, table = tune(index, queries, items, {"popularity_weight": [0.0]}, k=3)
    assert table["map"].iloc[0] == pytest.approx((1 + 2 / 3) / 2)
    _, excluded = tune(
        index,
        queries,
        items,
        {"popularity_weight": [0.0]},
        query_ids=[f"q{j}" for j in range(4)],
        k=3,
    )
    assert excluded["map"].iloc[0] == pytest.approx(0.5)


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        RankingConfig(mmr_lambda=1.5)
    with pytest.raises(ConfigError):
        RankingConfig(candidates=0)
    with pytest.raises(ConfigError):
        RankingConfig(tune_grid={"no_such": [1]})
    assert RankingConfig(categories="cats").categories == ["cats"]  # type: ignore[arg-type]


def test_tune_on_split_uses_only_that_split_and_refuses_a_missing_one() -> None:
    from imgsearch.search.tuning import tune_on_split

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 8))
    emb = np.repeat(centres, 3, axis=0) + 0.05 * rng.normal(size=(18, 8))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    meta = pd.DataFrame(
        {
            "image_id": [f"i{n}" for n in range(18)],
            "item_id": [f"t{n // 3}" for n in range(18)],
            "split": ["train"] * 9 + ["val"] * 9,
        }
    )
    cfg, table = tune_on_split(emb, meta, RankingConfig(), "fp", "val")
    assert cfg.popularity_weight == 0.0  # no popularity columns: the grid collapses
    assert int(table["n_queries"].iloc[0]) == 9  # only val images queried
    assert table["map"].iloc[0] > 0.9  # tight clusters: the other two drawings come first
    with pytest.raises(ValueError, match="split=='test'"):
        tune_on_split(emb, meta, RankingConfig(), "fp", "test")
