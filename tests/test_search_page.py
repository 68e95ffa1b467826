"""The Streamlit search page, driven by ``streamlit.testing.v1.AppTest`` against a tiny registered
champion in a temporary tracking store: upload and catalog queries, controls, versions shown,
votes stored, bad uploads refused with a message while the page keeps working."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from registry.feedback import FeedbackStore  # noqa: E402
from tests.search_env import SearchEnv, get_env, tracking  # noqa: E402
from tests.test_registry import fresh_tracking_uri  # noqa: E402

PAGE = str(Path(__file__).resolve().parent.parent / "app" / "search_page.py")
TIMEOUT = 120


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SearchEnv:
    return get_env(tmp_path_factory)


@pytest.fixture()
def app(env: SearchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AppTest]:
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    monkeypatch.setenv("IMGSEARCH_FEEDBACK_URL", url)
    with tracking(env.uri):
        at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
        at.run()
        assert not at.exception, at.exception
        yield at


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def _vote_keys(at: AppTest, sign: str) -> list[str]:
    """Keys of the thumbs-up (``+``) or thumbs-down (``-``) buttons, in rank order."""
    return [b.key for b in at.button if b.key and b.key.startswith(f"vote{sign}1-")]


def _upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.file_uploader(key="upload").set_value((name, data, "application/octet-stream"))
    at.run()
    assert not at.exception, at.exception
    return at


def test_page_shows_versions_and_asks_for_a_query(app: AppTest, env: SearchEnv) -> None:
    caption = " ".join(c.value for c in app.caption)
    assert f"imgsearch-index v{env.pair.index.version}" in caption
    assert f"extractor v{env.pair.extractor.version}" in caption
    assert not _errors(app)
    assert any("Upload an image" in i.value for i in app.info)
    assert sorted(app.multiselect(key="category").options) == ["cats", "dogs"]


def test_upload_ranks_the_image_itself_first_and_votes_are_stored(
    app: AppTest, env: SearchEnv
) -> None:
    _upload(app, "query.png", env.images[2])
    assert not _errors(app)
    names = [m.value for m in app.markdown if m.value.startswith("**")]
    assert len(names) == 6 and names[0] == "**1. thing 1**"

    app.button(key=_vote_keys(app, "+")[0]).click().run()
    app.button(key=_vote_keys(app, "-")[1]).click().run()
    assert not app.exception
    votes = FeedbackStore().votes()  # IMGSEARCH_FEEDBACK_URL points at this test's store
    assert votes["vote"].tolist() == [1, -1]
    assert votes["result_image_id"].tolist()[0] == "img2" and votes["rank"].tolist() == [1, 2]
    assert set(votes["index_version"]) == {str(env.pair.index.version)}
    assert set(votes["extractor_version"]) == {str(env.pair.extractor.version)}
    assert votes["query_image_id"].isna().all() and votes["session"].nunique() == 1


def test_controls_change_the_results(app: AppTest, env: SearchEnv) -> None:
    _upload(app, "query.png", env.images[0])
    app.number_input(key="k").set_value(2)
    app.multiselect(key="category").set_value(["dogs"])
    app.run()
    assert not app.exception and not _errors(app)
    captions = [c.value for c in app.caption if "score" in c.value]
    assert len(captions) == 2 and all(c.startswith("dogs") for c in captions)
    assert all(" · pop " in c for c in captions)  # this catalog has downloads and likes
    app.checkbox(key="exclude_nsfw").check().run()
    captions = [c.value for c in app.caption if "score" in c.value]
    assert len(captions) == 1  # img5 (dogs) is NSFW


def test_catalog_pick(app: AppTest, env: SearchEnv) -> None:
    app.radio(key="source").set_value("Pick from the catalog").run()
    app.selectbox(key="catalog_image").set_value("img4").run()
    assert not app.exception and not _errors(app)
    names = [m.value for m in app.markdown if m.value.startswith("**")]
    assert names[0] == "**1. thing 2**"
    app.button(key=_vote_keys(app, "+")[0]).click().run()
    assert FeedbackStore().votes()["query_image_id"].tolist() == ["img4"]

    app.text_input(key="catalog_filter").input("thing 0").run()
    assert app.selectbox(key="catalog_image").options == ["thing 0 (img0)", "thing 0 (img1)"]
    app.text_input(key="catalog_filter").input("no such thing").run()
    assert not app.exception and any("No catalog image" in i.value for i in app.info)


def _bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("notes.png", b"this is plain text, not a picture", "not"),
        ("empty.png", b"", "empty"),
        ("bomb.png", _bomb(), "pixels"),
        ("huge.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (21 * 1024 * 1024), "too large"),
    ],
    ids=["not-an-image", "empty", "bomb", "too-large"],
)
def test_bad_uploads_get_a_message_and_the_page_keeps_working(
    app: AppTest, env: SearchEnv, name: str, data: bytes, expected: str
) -> None:
    _upload(app, name, data)
    errors = _errors(app)
    assert len(errors) == 1 and "cannot be used as a query" in errors[0], errors
    assert expected in errors[0].lower(), errors[0]
    buf = io.BytesIO()
    Image.open(io.BytesIO(env.images[1])).save(buf, format="JPEG")
    _upload(app, "fine.jpg", buf.getvalue())  # the next upload is answered
    assert not _errors(app)
    assert [m.value for m in app.markdown if m.value.startswith("**")][0] == "**1. thing 0**"


def test_no_champion_is_a_message_not_a_crash(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGSEARCH_FEEDBACK_URL", f"sqlite:///{tmp_path / 'fb.db'}")
    empty = fresh_tracking_uri(tmp_path_factory, tmp_path)  # a store with no registered model
    with tracking(empty):
        at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
        at.run()
    assert not at.exception
    assert any("No model to search with" in e for e in _errors(at))


def test_a_typed_query_is_answered_and_a_restricted_one_refused(app: AppTest) -> None:
    app.text_input(key="words").input("cat").run()
    assert not _errors(app)
    assert not app.exception, app.exception
    assert _vote_keys(app, "+"), [w.value for w in app.warning]
    app.text_input(key="words").input("Ребёнок").run()
    assert any("restricted word" in e for e in _errors(app))
