"""The online A/B wired: the arms chosen for the served index version, the search path and the
page showing the interleaved list and storing each result's team with the impression (read back
after a re-open; an older impressions table gains the columns), and the daemon's report logged on
the job's run, a failing store going into the job's reason."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from imgsearch.config import CONFIG_DIR_ENV, config_dir
from imgsearch.search.interleave import ARM_A, ARM_B, TEAM, A, ABConfig, B
from imgsearch.search.reranker import FEATURES, LearnedReranker, RerankerConfig
from registry import reranker_model as rr
from registry.feedback import UP, FeedbackStore, Vote, query_sha256
from registry.impressions import Impression, ImpressionStore, Versions
from registry.search import FIRST_STAGE, SearchConfig, load_served, search, served_versions
from tests.search_env import SearchEnv, env_removing, tracking

SHA = query_sha256(b"an A/B query")


# --- the store --------------------------------------------------------------------------------


def test_teams_are_stored_read_back_after_a_reopen_and_an_old_table_gains_the_columns(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # the impressions table of the release before the A/B
        conn.execute(
            sa.text(
                "CREATE TABLE impressions (id INTEGER PRIMARY KEY, created_at DATETIME NOT NULL,"
                " query_id VARCHAR(64) NOT NULL, session VARCHAR(128), source VARCHAR(16),"
                " query_sha256 VARCHAR(64) NOT NULL, query_image_id VARCHAR(512),"
                " query_text TEXT, query_lang VARCHAR(16), rank INTEGER NOT NULL,"
                " result_image_id VARCHAR(512) NOT NULL, result_item_id VARCHAR(512),"
                " score FLOAT, similarity FLOAT, index_version VARCHAR(64),"
                " extractor_version VARCHAR(64), text_version VARCHAR(64),"
                " reranker_version VARCHAR(64))"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO impressions (created_at, query_id, query_sha256, rank,"
                " result_image_id) VALUES ('2026-01-01 00:00:00', 'old', :sha, 1, 'img0')"
            ),
            {"sha": SHA},
        )
    engine.dispose()

    store = ImpressionStore(url)
    shown = pd.DataFrame({"rank": [1, 2, 3], "image_id": ["a", "b", "c"], TEAM: [B, A, A]})
    qid = store.record(Impression(SHA, shown, Versions(index="3"), ab_arms=("first_stage", "r2")))
    store.record(Impression(SHA, shown.drop(columns=TEAM)))  # an ordinary list
    store.dispose()

    again = ImpressionStore(url)  # a new process
    everything = again.impressions()
    assert len(everything) == 7 and everything.loc[0, "query_id"] == "old"
    assert everything.loc[0, [TEAM, ARM_A, ARM_B]].isna().all()  # old rows: NULL
    ab = again.impressions(ab_only=True)
    assert set(ab["query_id"]) == {qid} and ab[TEAM].tolist() == [B, A, A]
    assert set(ab[ARM_A]) == {"first_stage"} and set(ab[ARM_B]) == {"r2"}
    with pytest.raises(ValueError, match="team"):
        Impression(SHA, shown.drop(columns=TEAM), ab_arms=("x", "y"))


# --- the served index with rerankers ------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SearchEnv]:
    """The shared search env; the rerankers registered here are removed afterwards."""
    yield from env_removing(tmp_path_factory, rr.RERANKER_MODEL)


def _register(env: SearchEnv, root: Path, feature: str, weight: float) -> ModelVersion:
    """A logistic reranker scoring by one feature (no training), registered for the served
    index version (as ``challenger``, like the rerank step)."""
    model = LearnedReranker(RerankerConfig("logistic"))
    model.coef_ = np.zeros(len(FEATURES))
    model.coef_[FEATURES.index(feature)] = weight
    model.mean_, model.scale_ = np.zeros(len(FEATURES)), np.ones(len(FEATURES))
    saved = model.save(root / f"{feature}{weight:+g}")
    table = pd.DataFrame(
        {"ndcg_at_10": [0.5, 0.6], "map_at_r": [0.4, 0.5]}, index=["first_stage", "logistic"]
    )
    client = MlflowClient(tracking_uri=env.uri, registry_uri=env.uri)
    with tracking(env.uri), mlflow.start_run():
        return rr.log_reranker_model(
            saved,
            index_version=str(env.pair.index.version),
            table=table,
            chosen="logistic",
            train_ids=[f"{feature}{weight}"],
            kind="logistic",
            client=client,
        )


@pytest.fixture(scope="module")
def champion_reranker(
    env: SearchEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelVersion]:
    """``imgsearch-reranker@champion`` (and ``@challenger``: the same version) reversing the
    first stage's order."""
    client = MlflowClient(tracking_uri=env.uri, registry_uri=env.uri)
    with tracking(env.uri):  # before any reranker: on, but nothing to compare
        served = load_served(SearchConfig(ab=ABConfig(enabled=True)), client)
    assert served.reranker is None and served.ab is None
    version = _register(env, tmp_path_factory.mktemp("rerankers"), "first_rank", 1.0)
    client.set_registered_model_alias(rr.RERANKER_MODEL, "champion", version.version)
    yield version


def test_the_pages_cache_key_moves_with_every_alias_it_serves(
    env: SearchEnv, champion_reranker: ModelVersion, tmp_path: Path
) -> None:
    """The page keys its loaded model on :func:`served_versions`: a promoted reranker (not only a
    promoted index) must change the key, so the page serves it without a restart."""
    client = MlflowClient(tracking_uri=env.uri, registry_uri=env.uri)
    on = SearchConfig(ab=ABConfig(enabled=True))
    with tracking(env.uri):
        before = served_versions(on, client)
        assert before[:3] == (
            str(env.pair.index.version),
            str(champion_reranker.version),
            str(champion_reranker.version),  # the challenger alias: the same version
        )
        assert served_versions(SearchConfig(use_reranker=False), client)[1:3] == ("", "")
        other = _register(env, tmp_path, "similarity", 2.0)
        client.set_registered_model_alias(rr.RERANKER_MODEL, "champion", other.version)
        try:
            after = served_versions(on, client)
            assert after[0] == before[0] and after[1] == str(other.version)
        finally:
            for alias in ("champion", "challenger"):
                client.set_registered_model_alias(
                    rr.RERANKER_MODEL, alias, champion_reranker.version
                )


def test_arms_and_the_interleaved_search_path(
    env: SearchEnv, champion_reranker: ModelVersion, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri=env.uri, registry_uri=env.uri)
    champion = f"{rr.RERANKER_MODEL} v{champion_reranker.version}"
    with tracking(env.uri):
        assert load_served(SearchConfig(), client).ab is None  # off by default
        served = load_served(SearchConfig(ab=ABConfig(enabled=True)), client)
        # the challenger alias is the champion's own version: B is the first stage
        assert served.ab is not None
        assert (served.ab.label_a, served.ab.label_b) == (champion, FIRST_STAGE)
        assert "A/B" in served.label
        hits = search(served, [env.images[0]], {"k": 4}, ab_key="s1:q")
        assert hits["rank"].tolist() == [1, 2, 3, 4] and hits[TEAM].isin([A, B]).all()
        assert hits["image_id"].is_unique
        again = search(served, [env.images[0]], {"k": 4}, ab_key="s1:q")
        assert again["image_id"].tolist() == hits["image_id"].tolist()
        first = search(load_served(SearchConfig(use_reranker=False), client), [env.images[0]])
        reversed_ = search(load_served(SearchConfig(), client), [env.images[0]], {"k": 6})
        for _, row in hits.iterrows():  # each result is where its own team's ranking put it
            source = reversed_ if row[TEAM] == A else first
            assert row["image_id"] in set(source["image_id"])
        assert hits.loc[hits[TEAM] == A, "image_id"].iloc[0] == reversed_["image_id"].iloc[0]
        assert hits.loc[hits[TEAM] == B, "image_id"].iloc[0] == first["image_id"].iloc[0]

        other = _register(env, tmp_path, "similarity", 1.0)  # a new challenger
        served = load_served(SearchConfig(ab=ABConfig(enabled=True)), client)
        assert served.ab is not None and served.ab.reranker_b is not None
        assert served.ab.label_b == f"{rr.RERANKER_MODEL} v{other.version}"
        client.set_registered_model_alias(
            rr.RERANKER_MODEL, "challenger", champion_reranker.version
        )


def _ab_configs(tmp_path: Path, **ab: object) -> Path:
    """A copy of configs/ with ``search.ab`` set (for the page, which reads its own config)."""
    directory = tmp_path / "configs"
    shutil.copytree(config_dir(), directory)
    path = directory / "search.yaml"
    data = yaml.safe_load(path.read_text())
    data["ab"] = {**data["ab"], **ab}
    path.write_text(yaml.safe_dump(data))
    return directory


def test_page_shows_the_interleaved_list_and_stores_teams_with_the_impression(
    env: SearchEnv,
    champion_reranker: ModelVersion,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from tests.test_search_page import PAGE, TIMEOUT, _upload, _vote_keys

    url = f"sqlite:///{tmp_path / 'page.db'}"
    monkeypatch.setenv("IMGSEARCH_FEEDBACK_URL", url)
    monkeypatch.setenv(CONFIG_DIR_ENV, str(_ab_configs(tmp_path, enabled=True)))
    with tracking(env.uri):
        at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
        at.run()
        assert not at.exception, at.exception
        assert any("A/B" in c.value for c in at.caption)
        _upload(at, "query.png", env.images[0])
        at.button(key=_vote_keys(at, "+")[0]).click().run()
        assert not at.exception, at.exception
    shown = ImpressionStore(url).impressions()
    assert shown["query_id"].nunique() == 1 and len(shown) == 6  # a re-run: the same list
    assert shown[TEAM].isin([A, B]).all() and set(shown[TEAM]) == {A, B}
    assert set(shown[ARM_A]) == {f"{rr.RERANKER_MODEL} v{champion_reranker.version}"}
    assert set(shown[ARM_B]) == {FIRST_STAGE}
    [vote] = FeedbackStore(url).votes().itertuples()
    assert vote.query_id == shown["query_id"].iloc[0] and vote.rank == 1
    assert vote.result_image_id == shown["result_image_id"].iloc[0]


# --- the daemon's report ---------------------------------------------------------------------------


def _fill(url: str, n: int, seed: int = 0) -> None:
    """``n`` A/B impressions where users up-vote arm B's results more often than arm A's."""
    rng = np.random.default_rng(seed)
    shown, votes = ImpressionStore(url), FeedbackStore(url)
    for _ in range(n):
        teams = [A, B, B, A] if rng.random() < 0.5 else [B, A, A, B]
        rows = pd.DataFrame({"rank": [1, 2, 3, 4], "image_id": list("abcd"), TEAM: teams})
        qid = shown.record(
            Impression(SHA, rows, Versions(index="1"), ab_arms=("first_stage", "r v2"))
        )
        for p, team in enumerate(teams):
            if rng.random() < (0.5 if team == B else 0.15):
                votes.record(Vote(SHA, "abcd"[p], p + 1, UP, query_id=qid))
    shown.dispose()
    votes.dispose()


def test_the_report_is_logged_on_the_run(
    env: SearchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitoring import ab_job

    url = f"sqlite:///{tmp_path / 'fb.db'}"
    monkeypatch.setenv("IMGSEARCH_FEEDBACK_URL", url)
    assert ab_job.report() == "skipped: no A/B impressions"
    _fill(url, 60)
    with tracking(env.uri), mlflow.start_run() as run:
        verdict = ab_job.report(overrides={"search.ab.min_impressions": 20})
    assert verdict == "B wins (r v2)"
    client = MlflowClient(tracking_uri=env.uri)
    data = client.get_run(run.info.run_id).data
    assert data.tags["ab.verdict"] == verdict and data.tags["ab.arm_b"] == "r v2"
    assert data.metrics["ab_wins_b"] > data.metrics["ab_wins_a"]
    assert data.metrics["ab_p_value"] < 0.05 and "ab_ties" in data.metrics
    with tracking(env.uri):
        report = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/ab_report.json")
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"ab_report.json", "ab_report.md", "ab_impressions.csv"} <= names
    [latest] = report["reports"]
    assert latest["winner"] == B and latest["enough_impressions"] and latest["impressions"] == 60

    monkeypatch.setenv("IMGSEARCH_FEEDBACK_URL", f"sqlite:///{tmp_path}")  # a directory
    assert ab_job.report().startswith("failed: OperationalError")


def test_the_improve_job_logs_the_report_and_a_failure_is_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitoring import improve
    from tests.test_improve import _point_mlflow, make_catalog, stage_overrides

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fb = f"sqlite:///{tmp_path / 'fb.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setenv("IMGSEARCH_FEEDBACK_URL", fb)
    _fill(fb, 30)
    overrides = stage_overrides(make_catalog(tmp_path / "catalog", 2, 2))
    _point_mlflow(uri)
    try:
        run_id = improve.run("ci", overrides)
        monkeypatch.setenv("IMGSEARCH_FEEDBACK_URL", f"sqlite:///{tmp_path}")  # a directory
        failed_id = improve.run("ci", overrides)
        client = MlflowClient()
        ok, failed = client.get_run(run_id), client.get_run(failed_id)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert ok.info.status == "FINISHED" and ok.data.tags["imgsearch.improve.decision"] == "skip"
    assert ok.data.tags["ab.verdict"].startswith("not enough impressions")  # 200 by default
    assert ok.data.metrics["ab_impressions"] == 30
    assert failed.info.status == "FINISHED" and "ab.verdict" not in failed.data.tags
    assert "A/B report failed: OperationalError" in failed.data.tags["imgsearch.improve.reason"]
