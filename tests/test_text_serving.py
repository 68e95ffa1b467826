"""Text queries through the registered index model: words in, ranked images out; restricted
words refused with the reason; flagged images skipped; a text model of another extractor refused."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from imgsearch.errors import ExtractorMismatchError
from registry import text_queries as tq
from registry.integrity import load_verified
from registry.text_model import check_text_artifacts
from tests.search_env import SearchEnv, get_env, tracking


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SearchEnv:
    return get_env(tmp_path_factory)


@pytest.fixture(scope="module")
def model(env: SearchEnv):  # type: ignore[no-untyped-def]
    with tracking(env.uri):
        yield load_verified("models:/imgsearch-index@champion")


def test_text_queries_are_ranked_and_skip_flagged_images(env: SearchEnv, model) -> None:  # type: ignore[no-untyped-def]
    with tracking(env.uri):
        out = model.predict(
            pd.DataFrame({"text": ["cat", "кошка"], "lang": ["en", "ru"]}), params={"k": 7}
        )
    assert out["error"].isna().all()
    assert out.groupby("query").size().tolist() == [5, 5]  # 6 images, img5 flagged: 5 left
    assert "img5" not in set(out["image_id"])
    assert out.groupby("query")["rank"].apply(list).tolist() == [list(range(1, 6))] * 2


def test_image_and_text_rows_mix_and_image_queries_still_see_everything(
    env: SearchEnv, model
) -> None:  # type: ignore[no-untyped-def]
    image = base64.b64encode(env.images[5]).decode()
    with tracking(env.uri):
        plain = model.predict(pd.DataFrame({"image": [image]}), params={"k": 1})
        mixed = model.predict(
            pd.DataFrame({"image": [image, image], "text": [None, "dog"]}),
            params={"k": 3, "text_weight": 0.3},
        )
    assert plain["image_id"].tolist() == ["img5"]  # flags apply to text queries only
    assert mixed[mixed["query"] == 0]["image_id"].iloc[0] == "img5"
    assert (mixed.groupby("query").size() == 3).all()


@pytest.mark.parametrize("text", ["CHILDREN", "child's toys", "детей", "Ребёнок", "k i d"])
def test_a_restricted_word_refuses_the_request_with_its_reason(
    env: SearchEnv, model, text: str
) -> None:  # type: ignore[no-untyped-def]
    with tracking(env.uri), pytest.raises(MlflowException, match="restricted word"):
        model.predict(pd.DataFrame({"text": ["cat", text]}))


def test_bad_text_requests_say_why(env: SearchEnv, model) -> None:  # type: ignore[no-untyped-def]
    with tracking(env.uri):
        with pytest.raises(MlflowException, match="text_weight"):
            model.predict(pd.DataFrame({"text": ["cat"]}), params={"text_weight": 2.0})
        with pytest.raises(MlflowException, match="no usable query"):
            model.predict(pd.DataFrame({"text": ["   "]}))
        with pytest.raises(MlflowException, match="characters"):
            model.predict(pd.DataFrame({"text": ["x" * 5000]}))


def test_a_text_encoder_of_another_extractor_is_refused(env: SearchEnv, tmp_path: Path) -> None:
    parts = {name: tmp_path / name for name in tq.TEXT_ARTIFACTS}
    for name in tq.TEXT_ARTIFACTS:
        shutil.copytree(env.root / name, parts[name])
    meta_file = parts[tq.ARTIFACT_TEXT] / "text_encoder.json"
    meta = json.loads(meta_file.read_text())
    assert check_text_artifacts(parts, meta["extractor_fingerprint"])  # its own: accepted
    with pytest.raises(ExtractorMismatchError, match="re-run align"):
        check_text_artifacts(parts, "0" * 64)
    side = tq.TextSide.load({k: str(v) for k, v in parts.items()}, meta["extractor_fingerprint"])
    assert side is not None and side.flagged == frozenset({"img5"})
    with pytest.raises(ExtractorMismatchError, match="re-run `align`"):
        tq.TextSide.load({k: str(v) for k, v in parts.items()}, "f" * 64)
