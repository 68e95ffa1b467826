"""The feedback store: votes round-trip, survive a restart (a new engine on the same file),
are validated, honour IMGSEARCH_FEEDBACK_URL, and never format values into SQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from registry.feedback import (
    DOWN,
    FEEDBACK_URL_ENV,
    UP,
    FeedbackStore,
    Vote,
    feedback_url,
    query_sha256,
)

SHA = query_sha256(b"a query")


def vote(**kw: object) -> Vote:
    base: dict[str, object] = {
        "query_sha256": SHA,
        "result_image_id": "img1",
        "result_item_id": "item1",
        "rank": 1,
        "score": 0.9,
        "vote": UP,
        "index_version": "3",
        "extractor_version": "2",
        "session": "s1",
    }
    base.update(kw)
    return Vote(**base)  # type: ignore[arg-type]


def test_votes_survive_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'feedback.db'}"  # the parent folder is created
    store = FeedbackStore(url)
    first = store.record(vote())
    second = store.record(vote(result_image_id="img2", rank=2, vote=DOWN, query_image_id="q7"))
    assert second > first
    store.dispose()

    again = FeedbackStore(url)  # a new process would do exactly this
    df = again.votes()
    assert df["result_image_id"].tolist() == ["img1", "img2"]
    assert df["vote"].tolist() == [1, -1]
    assert df["query_image_id"].tolist()[0] is None and df["query_image_id"].tolist()[1] == "q7"
    assert set(df.columns) >= {"id", "created_at", "query_sha256", "index_version", "session"}
    assert df["created_at"].notna().all()
    assert len(again.votes(query_sha256=SHA)) == 2
    assert again.votes(query_sha256="0" * 64).empty
    assert len(again.votes(index_version="3")) == 2 and again.votes(index_version="4").empty

    summary = again.summary().set_index("index_version")
    assert summary.loc["3", "votes"] == 2 and summary.loc["3", "up"] == 1
    assert summary.loc["3", "up_share"] == pytest.approx(0.5)
    # the table is a plain SQL table that other tools can read
    with sqlite3.connect(tmp_path / "sub" / "feedback.db") as conn:
        assert conn.execute("select count(*) from feedback").fetchone() == (2,)


def test_bad_votes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vote"):
        vote(vote=0)
    with pytest.raises(ValueError, match="sha256"):
        vote(query_sha256="abc")
    with pytest.raises(ValueError, match="rank"):
        vote(rank=0)
    with pytest.raises(ValueError, match="result_image_id"):
        vote(result_image_id="")


def test_url_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FEEDBACK_URL_ENV, raising=False)
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    assert feedback_url() == f"sqlite:///{tmp_path / 'home' / 'feedback.db'}"
    assert feedback_url("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.setenv(FEEDBACK_URL_ENV, "sqlite:///env.db")
    assert feedback_url("sqlite:///x.db") == "sqlite:///env.db"


def test_default_store_lives_in_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FEEDBACK_URL_ENV, raising=False)
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path / "home"))
    FeedbackStore().record(vote())
    assert (tmp_path / "home" / "feedback.db").is_file()


def test_values_are_bound_not_formatted(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    nasty = "x'); DROP TABLE feedback; --"
    store.record(vote(result_image_id=nasty, session=nasty))
    assert store.votes()["result_image_id"].tolist() == [nasty]


def test_bad_url_is_a_config_error() -> None:
    from imgsearch.errors import ConfigError

    with pytest.raises(ConfigError):
        FeedbackStore("not a url at all")
