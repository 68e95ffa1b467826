"""End to end: ``mlflow models serve`` of ``models:/imgsearch-index@champion`` answers image queries.

The champion is the session's tiny registered index (:mod:`tests.search_env`). The server runs as
a subprocess (``--env-manager local``) from a working directory outside the repository, so the
model must bring its own code (``code_paths``). Garbage gets a 4xx with a reason, and the server
keeps answering.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest
import requests
from PIL import Image

from registry import models
from tests.search_env import get_env, serve_model


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[bytes]]]:
    env = get_env(tmp_path_factory)
    with serve_model(env.uri, tmp_path_factory.mktemp("serve") / "elsewhere") as server:
        yield server.url, env.images


def _invoke(base: str, payload: dict | str) -> requests.Response:
    kwargs = {"json": payload} if isinstance(payload, dict) else {"data": payload}
    return requests.post(
        f"{base}/invocations", headers={"Content-Type": "application/json"}, timeout=60, **kwargs
    )


def test_served_index_ranks_a_png_and_survives_garbage(served: tuple[str, list[bytes]]) -> None:
    base, images = served
    png = base64.b64encode(images[4]).decode()
    ok = _invoke(
        base, {"dataframe_split": {"columns": ["image"], "data": [[png]]}, "params": {"k": 3}}
    )
    assert ok.status_code == 200, ok.text
    rows = ok.json()["predictions"]
    assert len(rows) == 3
    assert set(models.RESULT_COLUMNS) | {models.ERROR} <= set(rows[0])
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["image_id"] == "img4" and rows[0]["item_id"] == "item2"
    assert rows[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert rows[0]["error"] is None

    # a batch in the "inputs" format, one bad image among good ones: answered per query
    bad = base64.b64encode(b"GIF89a truncated").decode()
    mixed = _invoke(base, {"inputs": {"image": [bad, png]}, "params": {"k": 2}})
    assert mixed.status_code == 200, mixed.text
    by_query: dict[int, list[dict]] = {}
    for row in mixed.json()["predictions"]:
        by_query.setdefault(row["query"], []).append(row)
    assert by_query[0][0]["error"] and by_query[0][0]["image_id"] is None
    assert [r["image_id"] for r in by_query[1]][0] == "img4"

    garbage = _invoke(
        base, {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}
    )
    assert 400 <= garbage.status_code < 500
    assert garbage.json()["message"].startswith("no usable image")  # the reason, no input repr
    not_json = _invoke(base, "this is not json")
    assert 400 <= not_json.status_code < 500
    bad_k = _invoke(
        base, {"dataframe_split": {"columns": ["image"], "data": [[png]]}, "params": {"k": -1}}
    )
    assert 400 <= bad_k.status_code < 500 and "k must be" in bad_k.json()["message"]

    again = _invoke(base, {"dataframe_records": [{"image": png}], "params": {"k": 1}})
    assert again.status_code == 200 and again.json()["predictions"][0]["image_id"] == "img4"


def test_served_index_bounds_hostile_requests(served: tuple[str, list[bytes]]) -> None:
    """Issue #17 point 3 over real HTTP: every hostile request is a 4xx naming its reason, and
    the server keeps answering good queries."""
    base, images = served
    png = base64.b64encode(images[4]).decode()
    query = {"dataframe_split": {"columns": ["image"], "data": [[png]]}}

    typo = _invoke(base, {**query, "params": {"k": 2, "catgory": "dogs"}})
    assert 400 <= typo.status_code < 500, typo.text
    assert "catgory" in typo.json()["message"]

    nested = _invoke(base, '{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert 400 <= nested.status_code < 500, nested.text
    assert "nest" in nested.json()["message"].lower()

    buf = io.BytesIO()
    Image.new("L", (7000, 5714), 0).save(
        buf, format="PNG"
    )  # 39.998 MP: just under the decoder's 40 MP bomb limit
    bomb = base64.b64encode(buf.getvalue()).decode()
    bombs = _invoke(base, {"inputs": {"image": [bomb] * 8}})
    assert 400 <= bombs.status_code < 500, bombs.text
    assert "pixels" in bombs.json()["message"]

    ok = _invoke(base, {**query, "params": {"k": 2, "category": "dogs"}})
    assert ok.status_code == 200, ok.text
    assert {r["category"] for r in ok.json()["predictions"]} == {"dogs"}
