"""Impressions: written and read back across a restart, joined with votes; the served model's
hook writes them only when configured (by model config or env var), images by hash only; the
page writes one impression per list shown and its votes carry the impression's query id."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pandas as pd
import pytest

from registry.feedback import DOWN, UP, FeedbackStore, Vote, query_sha256
from registry.impressions import (
    IMPRESSIONS_URL_ENV,
    Impression,
    ImpressionStore,
    Versions,
    labelled,
)
from registry.integrity import load_verified
from registry.register import INDEX_MODEL
from tests.search_env import SearchEnv, get_env, tracking

SHA = query_sha256(b"a query")


def _shown(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rank": range(1, n + 1),
            "image_id": [f"img{i}" for i in range(n)],
            "item_id": [f"item{i}" for i in range(n)],
            "score": [0.9 - 0.1 * i for i in range(n)],
            "similarity": [0.9 - 0.1 * i for i in range(n)],
        }
    )


def test_impressions_and_votes_survive_a_restart_and_join(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    store = ImpressionStore(url)
    qid = store.record(Impression(SHA, _shown(), Versions(index="3", extractor="2"), session="s1"))
    votes = FeedbackStore(url)
    votes.record(Vote(SHA, "img1", 2, DOWN, query_id=qid, session="s1"))
    votes.record(Vote(SHA, "img1", 2, UP, query_id=qid, session="s1"))  # changed their mind
    votes.record(Vote(SHA, "img0", 1, UP, query_id=qid, session="s1"))
    store.dispose()
    votes.dispose()

    again = ImpressionStore(url)  # a new process
    shown = again.impressions(query_id=qid)
    assert shown["rank"].tolist() == [1, 2, 3]
    assert set(shown["index_version"]) == {"3"} and set(shown["session"]) == {"s1"}
    assert shown["query_sha256"].iloc[0] == SHA and shown["created_at"].notna().all()
    assert again.impressions(session="other").empty
    joined = labelled(shown, FeedbackStore(url).votes())
    assert joined["vote"].tolist() == [1, 1, 0]  # the last vote counts; unvoted rows are 0


def test_bad_impressions_are_refused() -> None:
    with pytest.raises(ValueError, match="sha256"):
        Impression("abc", _shown())
    with pytest.raises(ValueError, match="rank"):
        Impression(SHA, pd.DataFrame({"image_id": ["a"]}))


# --- the served model's hook -------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SearchEnv:
    return get_env(tmp_path_factory)


def _load(env: SearchEnv, **config: object):  # type: ignore[no-untyped-def]
    with tracking(env.uri):
        return load_verified(f"models:/{INDEX_MODEL}/{env.pair.index.version}", model_config=config)


def test_served_model_logs_impressions_only_when_configured(
    env: SearchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(IMPRESSIONS_URL_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 'imp.db'}"
    frame = pd.DataFrame({"image": [base64.b64encode(env.images[0]).decode()]})

    plain = _load(env)
    plain.predict(frame, params={"k": 3})
    assert not (tmp_path / "imp.db").exists()  # no hook, no store

    hooked = _load(env, impressions_url=url)
    hooked.predict(frame, params={"k": 3, "session": "abc"})
    shown = ImpressionStore(url).impressions()
    assert shown["rank"].tolist() == [1, 2, 3] and shown["query_id"].nunique() == 1
    assert shown["query_sha256"].iloc[0] == hashlib.sha256(env.images[0]).hexdigest()
    assert set(shown["source"]) == {"model"} and set(shown["session"]) == {"abc"}
    assert set(shown["index_version"]) == {str(env.pair.index.version)}

    texts = pd.DataFrame({"text": ["cat"], "lang": ["en"]})
    hooked.predict(texts, params={"k": 2})
    shown = ImpressionStore(url).impressions()
    assert shown["query_text"].dropna().unique().tolist() == ["cat"]
    with pytest.raises(Exception, match="restricted"):
        hooked.predict(pd.DataFrame({"text": ["Ребёнок"]}), params={"k": 2})
    assert "Ребёнок" not in set(ImpressionStore(url).impressions()["query_text"].dropna())


def test_env_var_turns_the_hook_on_and_a_dead_store_never_fails_a_request(
    env: SearchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv(IMPRESSIONS_URL_ENV, url)
    model = _load(env)
    frame = pd.DataFrame({"image": [base64.b64encode(env.images[1]).decode()]})
    model.predict(frame, params={"k": 2})
    assert len(ImpressionStore(url).impressions()) == 2
    (tmp_path / "env.db").unlink()
    (tmp_path / "env.db").mkdir()  # the file is now a directory: every write fails
    out = model.predict(frame, params={"k": 2})
    assert len(out) == 2 and out["error"].isna().all()


# --- the page ------------------------------------------------------------------------------------


def test_page_stores_one_impression_per_list_and_refines_with_votes(
    env: SearchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from tests.test_search_page import PAGE, TIMEOUT, _upload, _vote_keys

    url = f"sqlite:///{tmp_path / 'page.db'}"
    monkeypatch.setenv("IMGSEARCH_FEEDBACK_URL", url)
    with tracking(env.uri):
        at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
        at.run()
        _upload(at, "query.png", env.images[0])
        first = ImpressionStore(url).impressions()
        assert first["query_id"].nunique() == 1 and len(first) == 6
        assert set(first["source"]) == {"page"}

        at.button(key=_vote_keys(at, "+")[2]).click().run()  # liked: the 3rd result
        at.button(key=_vote_keys(at, "-")[1]).click().run()  # disliked: the 2nd result
        votes = FeedbackStore(url).votes()
        assert set(votes["query_id"]) == set(first["query_id"])
        assert ImpressionStore(url).impressions()["query_id"].nunique() == 1  # re-runs: same list

        disliked = votes.loc[votes["vote"] == DOWN, "result_image_id"].iloc[0]
        refine = [b for b in at.button if b.key and b.key.startswith("refine-")]
        assert len(refine) == 1
        refine[0].click().run()
        assert not at.exception, at.exception
        shown = ImpressionStore(url).impressions()
        assert shown["query_id"].nunique() == 2  # the refined list is a new impression
        latest = shown[shown["query_id"] != first["query_id"].iloc[0]]
        assert disliked not in set(latest["result_image_id"])
