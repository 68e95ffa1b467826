"""The learned reranker: smoothed vote rates and metrics against naive references, a planted
preference recovered, plain-text persistence, the gate, and the registry's index-version check."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from imgsearch.errors import ConfigError
from imgsearch.search import click_sim
from imgsearch.search.rerank_eval import DEFAULT_CANDIDATES, compare
from imgsearch.search.reranker import (
    FEATURES,
    LearnedReranker,
    RerankerConfig,
    attribute_agreement,
    features,
    ranking_metrics,
    rates_without,
    vote_counts,
    vote_rates,
)
from registry import reranker_model as rr
from registry.integrity import ArtifactIntegrityError
from tests.search_env import SearchEnv, env_removing, tracking


def test_training_rows_vote_rates_leave_their_own_query_out() -> None:
    """A training row's up_rate is computed without its own query's votes: the same rate as
    from the other queries' rows alone (smoothed toward the same global prior)."""
    df = pd.DataFrame(
        {
            "query_id": ["q1", "q1", "q2", "q2", "q3"],
            "result_image_id": ["a", "b", "a", "b", "a"],
            "vote": [1, 0, -1, 1, 1],
        }
    )
    counts = vote_counts(df)
    own = vote_counts(df[df["query_id"] == "q1"])
    left_out = rates_without(counts, own)
    # by hand: "a" elsewhere shown twice (q2 down, q3 up), "b" once (q2 up); prior from all 5 rows
    p_up, p_down = 3 / 5, 1 / 5
    assert left_out.loc["a", "up_rate"] == pytest.approx((1 + 10 * p_up) / (2 + 10))
    assert left_out.loc["a", "down_rate"] == pytest.approx((1 + 10 * p_down) / (2 + 10))
    assert left_out.loc["b", "up_rate"] == pytest.approx((1 + 10 * p_up) / (1 + 10))
    # an image only this query showed falls back to the prior
    solo = rates_without(counts, vote_counts(df[df["query_id"] == "q3"]))
    assert solo.loc["a", "shown"] == 2
    assert vote_rates(df).loc["a", "up_rate"] == pytest.approx((2 + 10 * p_up) / (3 + 10))


def test_vote_rates_are_smoothed_toward_the_global_rate() -> None:
    df = pd.DataFrame(
        {"result_image_id": ["a", "a", "a", "b", "c", "c"], "vote": [1, 1, 0, -1, 0, 0]}
    )
    rates = vote_rates(df, strength=2.0)
    p_up, p_down = 2 / 6, 1 / 6
    assert rates.loc["a", "up_rate"] == pytest.approx((2 + 2 * p_up) / (3 + 2))
    assert rates.loc["b", "down_rate"] == pytest.approx((1 + 2 * p_down) / (1 + 2))
    assert rates.loc["c", "up_rate"] == pytest.approx((0 + 2 * p_up) / (2 + 2))
    cands = pd.DataFrame(
        {
            "image_id": ["a", "zz"],
            "similarity": [0.9, 0.8],
            "popularity": [0.5, 0.1],
            "category": ["x", "y"],
        }
    )
    x = features(cands, rates, query_category="y")
    assert x.shape == (2, len(FEATURES))
    assert x[1, FEATURES.index("up_rate")] == pytest.approx(p_up)  # never shown: the prior
    assert x[:, FEATURES.index("first_rank")].tolist() == [1.0, 2.0]
    assert x[:, FEATURES.index("category_match")].tolist() == [0.0, 1.0]


def _naive_ndcg(rel: list[float], order: list[int], k: int) -> float:
    dcg = sum(rel[j] / math.log2(i + 2) for i, j in enumerate(order[:k]))
    ideal = sorted(rel, reverse=True)
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
    return dcg / idcg


def test_ranking_metrics_match_naive_references() -> None:
    rel = [np.array([0.0, 2.0, 1.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])]
    orders = [np.array([3, 1, 0, 4, 2]), np.array([1, 2, 0])]
    got = ranking_metrics(rel, orders, k=3)
    want_ndcg = np.mean(
        [_naive_ndcg(list(r), list(o), 3) for r, o in zip(rel, orders, strict=True)]
    )
    assert got["ndcg_at_3"] == pytest.approx(want_ndcg)
    # MAP@R: q0 has R=3 relevant; in the order [0,1,0,1,1] only rank 2 within R: (1/2)/3
    # q1 has R=1; its relevant item at rank 3 is beyond R: 0
    assert got["map_at_r"] == pytest.approx(np.mean([(1 / 2) / 3, 0.0]))
    ideal = ranking_metrics(rel, [np.argsort(-r, kind="stable") for r in rel], k=3)
    assert ideal["ndcg_at_3"] == pytest.approx(1.0) and ideal["map_at_r"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="permutation"):
        ranking_metrics(rel[:1], [np.array([0, 0, 1, 2, 3])])


@pytest.fixture(scope="module")
def sessions() -> tuple[pd.DataFrame, pd.DataFrame]:
    vectors, meta = click_sim.synthetic_catalog(n_images=500, seed=3)
    test_q = click_sim.query_split(meta)
    rows = np.arange(len(meta))
    train = click_sim.simulate(vectors, meta, rows[~test_q], sessions_per_query=2, seed=4)
    test = click_sim.simulate(vectors, meta, rows[test_q], seed=5)
    return train, test


def test_a_planted_preference_is_recovered(sessions: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, test = sessions
    table, models = compare(train, test)
    first = table.loc["first_stage", "ndcg_at_10"]
    assert set(models) == set(DEFAULT_CANDIDATES) - {"first_stage"}
    for name in ("logistic", "lambdarank", "lambdarank_debiased"):
        assert table.loc[name, "ndcg_at_10"] > first + 0.1, table
    assert table.loc["ideal", "ndcg_at_10"] == pytest.approx(1.0)
    # the learned model leans on what the hidden truth uses: category match and vote rates
    booster = models["lambdarank_debiased"].booster_
    gain = dict(zip(FEATURES, booster.feature_importance("gain"), strict=True))
    assert gain["category_match"] + gain["up_rate"] > gain["first_rank"]


def test_queries_in_both_train_and_test_are_refused(
    sessions: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    train, _ = sessions
    with pytest.raises(ValueError, match="both train and test"):
        compare(train, train.head(40))


@pytest.mark.parametrize("kind", ["logistic", "lambdarank"])
def test_save_load_round_trip_is_plain_text(
    kind: str, sessions: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    train, _ = sessions
    _, models = compare(train.iloc[:4000], sessions[1].iloc[:400], {kind: RerankerConfig(kind)})
    model = models[kind]
    saved = model.save(tmp_path / "r")
    for path in saved.iterdir():
        path.read_text()  # text (JSON / LightGBM model text), never a pickle
    again = LearnedReranker.load(saved)
    x = np.random.default_rng(0).normal(size=(7, len(FEATURES)))
    np.testing.assert_allclose(again.score(x), model.score(x))


def test_gate_refuses_a_worse_or_equal_reranker() -> None:
    table = pd.DataFrame(
        {"ndcg_at_10": [0.6, 0.55, 0.6, 0.7]},
        index=["first_stage", "worse", "tie", "better"],
    )
    assert not rr.gate(table, "worse").passed
    assert not rr.gate(table, "tie").passed
    decision = rr.gate(table, "better")
    assert decision.passed and "beats" in decision.reason


# --- the registry ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SearchEnv]:
    """The shared search env; the rerankers registered here are removed afterwards."""
    yield from env_removing(tmp_path_factory, rr.RERANKER_MODEL)


def test_registered_reranker_is_tagged_gated_and_refused_for_another_index(
    env: SearchEnv, sessions: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    train, test = sessions
    table, models = compare(
        train, test, {"first_stage": None, "logistic": RerankerConfig("logistic")}
    )
    index_version = str(env.pair.index.version)
    client = MlflowClient(tracking_uri=env.uri, registry_uri=env.uri)
    with tracking(env.uri), mlflow.start_run():
        saved = models["logistic"].save(tmp_path / "reranker")
        version = rr.log_reranker_model(
            saved,
            index_version=index_version,
            table=table,
            chosen="logistic",
            train_ids=sorted(train["query_id"].unique()),
            kind="logistic",
            client=client,
        )
        tags = version.tags
        assert tags["index_version"] == index_version
        assert tags["extractor_version"] == str(env.pair.extractor.version)
        assert "sha256.model" in tags and "sha256.reranker/reranker.json" in tags
        assert float(tags["metric.ndcg_at_10"]) == pytest.approx(
            table.loc["logistic", "ndcg_at_10"]
        )

        worse = rr.gate(table.assign(ndcg_at_10=[0.9, 0.1, 1.0]), "logistic")
        assert not rr.apply_gate(client, version, worse)
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_model_version_by_alias(rr.RERANKER_MODEL, "champion")
        assert rr.apply_gate(client, version, rr.gate(table, "logistic"))

        model = rr.load_reranker(index_version, client=client)
        hits = pd.DataFrame(
            {
                "query": [0, 0, 0],
                "rank": [1, 2, 3],
                "image_id": ["img1", "img2", "img3"],
                "similarity": [0.9, 0.8, 0.7],
                "popularity": [0.0, 0.0, 1.0],
                "category": ["c1", "c2", "c1"],
            }
        )
        out = model.predict(hits)
        assert sorted(out["first_rank"]) == [1, 2, 3] and out["rank"].tolist() == [1, 2, 3]
        assert out["rerank_score"].is_monotonic_decreasing

        # the search page / CLI path: the champion reranker of the served index is used
        from registry.search import SearchConfig, load_served, search

        served = load_served(SearchConfig(), client)
        assert served.reranker_version == str(version.version)
        assert f"{rr.RERANKER_MODEL} v{version.version}" in served.label
        answer = search(served, [env.images[0]], {"k": 3})
        assert answer["rank"].tolist() == [1, 2, 3] and "first_rank" in answer.columns
        assert not load_served(SearchConfig(use_reranker=False), client).reranker
        with pytest.raises(rr.RerankerMismatchError, match="trained for"):
            rr.load_reranker(str(int(index_version) + 1), client=client)

        # a tampered spec file is refused before it is parsed
        client.set_model_version_tag(
            rr.RERANKER_MODEL, version.version, "sha256.reranker/reranker.json", "0" * 64
        )
        with pytest.raises(ArtifactIntegrityError):
            rr.load_reranker(index_version, client=client)


# --- the rerank step ------------------------------------------------------------------------------


def test_step_on_a_synthetic_catalog_measures_and_registers_nothing(env: SearchEnv) -> None:
    from steps import rerank

    client = MlflowClient(tracking_uri=env.uri, registry_uri=env.uri)
    before = len(client.search_model_versions(f"name = '{rr.RERANKER_MODEL}'"))
    with tracking(env.uri):
        run_id = rerank.run(
            overrides={"rerank.catalog": "synthetic", "rerank.synthetic_images": 300}
        )
    run = client.get_run(run_id)
    metrics = run.data.metrics
    for name in ("first_stage", "logistic", "lambdarank", "lambdarank_debiased", "ideal"):
        assert f"{name}.ndcg_at_10" in metrics and f"{name}.map_at_r" in metrics
    assert metrics["lambdarank_debiased.ndcg_at_10"] > metrics["first_stage.ndcg_at_10"]
    assert run.data.tags["rerank.promoted"] == "false"
    assert len(client.search_model_versions(f"name = '{rr.RERANKER_MODEL}'")) == before


def _fill_store(env: SearchEnv, url: str, repeats: int = 8) -> int:
    """Impressions and votes of simulated users on the served index, written as the page would;
    returns the number of votes."""
    from datetime import datetime, timedelta, timezone

    from registry.feedback import FeedbackStore, Vote, query_sha256
    from registry.impressions import Impression, ImpressionStore, Versions

    meta = env.meta
    vectors = np.eye(len(meta), 8, dtype=np.float32) + 0.3
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = np.tile(np.arange(len(meta)), repeats)
    clicks = click_sim.ClickModel(click=(0.1, 0.8, 0.95))
    sessions = click_sim.simulate(vectors, meta, queries, shown=5, clicks=clicks, seed=0)
    shown, votes = ImpressionStore(url), FeedbackStore(url)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    version = str(env.pair.index.version)
    n_votes = 0
    for n, (_, rows) in enumerate(sessions.groupby(np.arange(len(sessions)) // 5, sort=True)):
        sha = query_sha256(f"query {n}".encode())
        qid = shown.record(
            Impression(
                sha,
                rows.rename(columns={"result_image_id": "image_id"}),
                Versions(index=version),
                query_image_id=str(meta["image_id"].iloc[int(rows["query_row"].iloc[0])]),
            ),
            now=start + timedelta(minutes=n),
        )
        for r in rows[rows["vote"] != 0].itertuples():
            votes.record(
                Vote(sha, r.result_image_id, int(r.rank), int(r.vote), index_version=version,
                     query_id=qid)
            )  # fmt: skip
            n_votes += 1
    return n_votes


def test_step_learns_from_the_feedback_store(
    env: SearchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Impressions and votes of the served index train a reranker registered for that index
    version; the held-out queries are the latest ones."""
    from steps import rerank

    url = f"sqlite:///{tmp_path / 'fb.db'}"
    monkeypatch.setenv("IMGSEARCH_FEEDBACK_URL", url)
    _fill_store(env, url)
    with tracking(env.uri):
        run_id = rerank.run(
            overrides={
                "rerank.source": "store",
                "rerank.ranking": "lambdarank",
                "rerank.min_queries": 10,
            }
        )
    client = MlflowClient(tracking_uri=env.uri, registry_uri=env.uri)
    run = client.get_run(run_id)
    assert run.data.metrics["test_queries"] == pytest.approx(round(8 * len(env.meta) * 0.3), abs=1)
    version = str(env.pair.index.version)
    registered = client.get_model_version(rr.RERANKER_MODEL, run.data.tags["rerank.version"])
    assert registered.tags["index_version"] == version
    assert registered.tags["reranker_kind"] == "lambdarank"
    assert "metric.first_stage.ndcg_at_10" in registered.tags


def test_the_daemon_retrains_when_enough_new_votes_came(
    env: SearchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitoring import reranker_job
    from registry.feedback import FeedbackStore

    url = f"sqlite:///{tmp_path / 'fb.db'}"
    monkeypatch.setenv("IMGSEARCH_FEEDBACK_URL", url)
    n_votes = _fill_store(env, url)
    client = MlflowClient(tracking_uri=env.uri, registry_uri=env.uri)
    version = str(env.pair.index.version)
    assert reranker_job.new_votes(client, FeedbackStore(url), version) == n_votes
    with tracking(env.uri):
        high = {"rerank.retrain_min_new_votes": n_votes + 1, "rerank.min_queries": 10}
        assert reranker_job.maybe_retrain(overrides=high, client=client).startswith("skipped")
        low = {"rerank.retrain_min_new_votes": 1, "rerank.min_queries": 10}
        assert reranker_job.maybe_retrain(overrides=low, client=client).startswith("retrained")
    assert reranker_job.new_votes(client, FeedbackStore(url), version) == 0


def test_step_refuses_too_little_feedback(
    env: SearchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgsearch.errors import ConfigError
    from steps import rerank

    monkeypatch.setenv("IMGSEARCH_FEEDBACK_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    with tracking(env.uri), pytest.raises(ConfigError, match="collect more feedback"):
        rerank.run(overrides={"rerank.source": "store"})


# --- attribute agreement ---------------------------------------------------------------------------


def _attribute_sessions(n_queries: int, seed: int, shown: int = 20) -> pd.DataFrame:
    """Users want the query's vendor, which neither similarity nor vote rates show (a pool of
    300 images with one vendor each, shown to queries of every vendor); an attributes model
    predicts the query's vendor, right 80% of the time, with probability 0.5-0.9 on its guess."""
    vendors = np.array(["apple", "google", "samsung"])
    pool = np.random.default_rng(0).choice(vendors, 300)
    rng = np.random.default_rng(seed)
    clicks = np.array([0.05, 0.5, 0.9])
    frames = []
    for q in range(n_queries):
        true = rng.choice(vendors)
        guess = true if rng.random() < 0.8 else rng.choice(vendors)
        p = rng.uniform(0.5, 0.9)
        predicted = {"vendor": {v: (p if v == guess else (1 - p) / 2) for v in vendors}}
        picked = rng.choice(len(pool), shown, replace=False)
        cand = pool[picked]
        grade = np.where(cand == true, 1 + (rng.random(shown) < 0.5), 0)
        ranks = np.arange(1, shown + 1)
        seen = rng.random(shown) < 1.0 / ranks
        up = seen & (rng.random(shown) < clicks[grade])
        frame = pd.DataFrame(
            {
                "query_id": f"q{seed}-{q}",
                "rank": ranks,
                "result_image_id": [f"img{i}" for i in picked],
                "similarity": np.sort(rng.uniform(0.3, 0.9, shown))[::-1],
                "popularity": rng.random(shown),
                "category": "faces",
                "vendor": cand,
                "grade": grade,
                "vote": up.astype(int),
            }
        )
        frame["attribute_agreement"] = attribute_agreement(frame, predicted)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_attribute_agreement_is_the_predicted_probability_of_the_catalog_label() -> None:
    cands = pd.DataFrame({"vendor": ["a", "b", None], "category": ["x", "y", "x"]})
    predicted = {"vendor": {"a": 0.7, "b": 0.2}, "category": {"x": 0.9}, "missing": {"z": 1.0}}
    got = attribute_agreement(cands, predicted)
    np.testing.assert_allclose(got, [(0.7 + 0.9) / 2, (0.2 + 0.0) / 2, (0.0 + 0.9) / 2])
    np.testing.assert_array_equal(attribute_agreement(cands, {"other": {"a": 1.0}}), [0, 0, 0])


def test_a_preference_for_attribute_agreement_is_recovered_only_with_the_feature(
    tmp_path: Path,
) -> None:
    train, test = _attribute_sessions(300, seed=1), _attribute_sessions(150, seed=2)
    candidates = {
        "first_stage": None,
        "lambdarank": RerankerConfig(debias=True),
        "lambdarank_attributes": RerankerConfig(debias=True, attributes=True),
    }
    table, models = compare(train, test, candidates)
    with_attrs = table.loc["lambdarank_attributes", "ndcg_at_10"]
    assert with_attrs > table.loc["lambdarank", "ndcg_at_10"] + 0.1, table
    assert with_attrs > table.loc["first_stage", "ndcg_at_10"] + 0.1, table

    model = LearnedReranker.load(models["lambdarank_attributes"].save(tmp_path / "r"))
    assert model.feature_names[-1] == "attribute_agreement"
    hits = test[test["query_id"] == test["query_id"].iloc[0]].rename(
        columns={"result_image_id": "image_id"}
    )
    assert model.rerank(hits)["rank"].tolist() == list(range(1, 21))
    with pytest.raises(ConfigError, match="attribute_agreement"):  # no attributes model: refused
        model.rerank(hits.drop(columns="attribute_agreement"))
    assert "attribute_agreement" not in models["lambdarank"].feature_names
    with pytest.raises(ConfigError, match="attribute_agreement"):
        compare(train.drop(columns="attribute_agreement"), test, candidates)
