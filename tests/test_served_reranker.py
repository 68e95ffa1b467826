"""``imgsearch serve`` bundles the champion reranker into its checked copy of the index model."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient

from imgsearch.search import click_sim
from imgsearch.search.rerank_eval import compare
from imgsearch.search.reranker import RerankerConfig
from registry import reranker_model as rr
from registry import served_rerank as sr
from registry.integrity import ArtifactIntegrityError, download_verified, load_verified
from tests.search_env import SearchEnv, env_removing, free_port, run_process, tracking
from tests.test_reranker import _attribute_sessions


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SearchEnv]:
    """The shared search env; the rerankers registered here are removed afterwards."""
    yield from env_removing(tmp_path_factory, rr.RERANKER_MODEL)


def _register(
    env: SearchEnv, tmp_path: Path, index_version: str, champion: bool, attributes: bool = False
) -> str:
    """A logistic reranker trained on simulated sessions, registered for ``index_version``."""
    if attributes:
        train, test = _attribute_sessions(60, seed=1), _attribute_sessions(30, seed=2)
    else:
        vectors, meta = click_sim.synthetic_catalog(n_images=200, seed=3)
        test_q = click_sim.query_split(meta)
        rows = np.arange(len(meta))
        train = click_sim.simulate(vectors, meta, rows[~test_q], seed=4)
        test = click_sim.simulate(vectors, meta, rows[test_q], seed=5)
    config = RerankerConfig("logistic", attributes=attributes)
    table, models = compare(train, test, {"first_stage": None, "logistic": config})
    client = MlflowClient(tracking_uri=env.uri, registry_uri=env.uri)
    with mlflow.start_run():
        saved = models["logistic"].save(tmp_path / "reranker")
        version = rr.log_reranker_model(
            saved,
            index_version=index_version,
            table=table,
            chosen="logistic",
            train_ids=sorted(map(str, train["query_id"].unique())),
            kind="logistic",
            client=client,
        )
    if champion:
        client.set_registered_model_alias(rr.RERANKER_MODEL, "champion", str(version.version))
    return str(version.version)


def _copy(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return download_verified("models:/imgsearch-index@champion", tmp_path / "copy")


def _query(env: SearchEnv) -> pd.DataFrame:
    return pd.DataFrame({"image": [base64.b64encode(env.images[0]).decode()]})


def test_serve_bundles_the_champion_reranker_of_the_served_index(
    env: SearchEnv, tmp_path: Path
) -> None:
    index_version = str(env.pair.index.version)
    with tracking(env.uri):
        client = MlflowClient()
        local, files = _copy(tmp_path)
        assert sr.downloaded_version(local) == index_version
        (line,) = sr.prepare_copy(local, files, attributes_alias=None)
        assert line.startswith(f"no {rr.RERANKER_MODEL}@champion")

        version = _register(env, tmp_path, index_version, champion=True)
        local, files = _copy(tmp_path / "again")
        (line,) = sr.prepare_copy(local, files, attributes_alias=None, client=client)
        assert line == f"reranked by {rr.RERANKER_MODEL} v{version} (@champion)"
        served = mlflow.pyfunc.load_model(str(local))
        answer = served.predict(_query(env), params={"k": 3})
        assert answer["rank"].tolist() == [1, 2, 3]
        assert {"first_rank", "rerank_score"} <= set(answer.columns)
        assert answer["rerank_score"].is_monotonic_decreasing
        assert served.unwrap_python_model().reranker.version == version

        # the same order as the page / CLI path (first stage at depth 20, reranked, cut to k)
        plain = load_verified(f"models:/imgsearch-index/{index_version}", client=client)
        first = plain.predict(_query(env), params={"k": sr.RERANK_DEPTH})
        assert "rerank_score" not in first.columns  # a registered version alone: no reranker
        page = rr.rerank_hits(rr.load_reranker(index_version, client=client), first, 3)
        assert answer["image_id"].tolist() == page["image_id"].tolist()

        # a bundled file changed after the copy was checked is refused before it is parsed
        spec = local / "artifacts" / sr.ARTIFACT_RERANKER / "reranker.json"
        spec.write_text(spec.read_text().replace("logistic", "lambdarank"))
        with pytest.raises(ArtifactIntegrityError, match="reranker"):
            mlflow.pyfunc.load_model(str(local))


def test_serve_refuses_a_reranker_of_another_index_or_old_code(
    env: SearchEnv, tmp_path: Path
) -> None:
    index_version = str(env.pair.index.version)
    with tracking(env.uri):
        other = _register(env, tmp_path, index_version, champion=False)
        client = MlflowClient()
        client.set_model_version_tag(rr.RERANKER_MODEL, other, "index_version", "999")
        client.set_registered_model_alias(rr.RERANKER_MODEL, "champion", other)
        local, files = _copy(tmp_path)
        (line,) = sr.prepare_copy(local, files, attributes_alias=None, client=client)
        assert "trained for" in line and "not used" in line
        assert not (local / "artifacts" / sr.ARTIFACT_RERANKER).exists()
        answer = mlflow.pyfunc.load_model(str(local)).predict(_query(env), params={"k": 3})
        assert "rerank_score" not in answer.columns and len(answer) == 3

        client.set_model_version_tag(rr.RERANKER_MODEL, other, "index_version", index_version)
        local, files = _copy(tmp_path / "old")
        shutil.rmtree(local / "code" / "registry")  # stands for code that predates the module
        (local / "code" / "registry").mkdir()
        (line,) = sr.prepare_copy(local, files, attributes_alias=None, client=client)
        assert "predates" in line

        # one trained with attribute_agreement: the served index does not compute it, refused
        _register(env, tmp_path / "attrs", index_version, champion=True, attributes=True)
        local, files = _copy(tmp_path / "attrs")
        (line,) = sr.prepare_copy(local, files, attributes_alias=None, client=client)
        assert "attribute_agreement" in line
        from registry.search import SearchConfig, load_served

        assert load_served(SearchConfig(), client).reranker is None  # the page refuses it too


def test_imgsearch_serve_answers_reranked_over_http(env: SearchEnv, tmp_path: Path) -> None:
    """For real: ``imgsearch serve`` with a champion reranker answers ``rerank_score`` rows."""
    index_version = str(env.pair.index.version)
    with tracking(env.uri):
        version = _register(env, tmp_path, index_version, champion=True)
    port = free_port()
    exe = Path(sys.executable).with_name("imgsearch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "imgsearch.cli"]
    base = f"http://127.0.0.1:{port}"
    server_env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": env.uri,
        "MLFLOW_REGISTRY_URI": env.uri,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    log_path = tmp_path / "serve.log"
    with run_process(
        [*cmd, "serve", "--port", str(port)],
        url=base,
        ready_url=f"{base}/ping",
        log_path=log_path,
        cwd=tmp_path,
        env=server_env,
    ):
        png = base64.b64encode(env.images[2]).decode()
        body = {"dataframe_split": {"columns": ["image"], "data": [[png]]}, "params": {"k": 4}}
        answer = requests.post(f"{base}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        rows = answer.json()["predictions"]
        assert [r["rank"] for r in rows] == [1, 2, 3, 4]
        assert all("rerank_score" in r and "first_rank" in r for r in rows)
    assert f"reranked by {rr.RERANKER_MODEL} v{version}" in log_path.read_text()


def test_served_copy_answers_the_query_images_predicted_attributes(
    env: SearchEnv, tmp_path: Path
) -> None:
    """Heads of the served extractor version are bundled: each row of an image query carries
    its query's top label and probability per attribute; heads of another extractor version are
    not bundled, and a text query answers without them."""
    from registry.attributes_model import ATTRIBUTES_MODEL
    from registry.tags import TAG_EXTRACTOR_VERSION
    from tests.test_search_cli import _register_heads

    with tracking(env.uri):
        client = MlflowClient()
        try:
            version = _register_heads(env, tmp_path)
            local, files = _copy(tmp_path)
            lines = sr.prepare_copy(local, files, reranker_alias=None, client=client)
            assert lines == [f"predicted attributes from {ATTRIBUTES_MODEL} v{version} (@champion)"]
            served = mlflow.pyfunc.load_model(str(local))
            images = [base64.b64encode(env.images[i]).decode() for i in (0, 4)]
            answer = served.predict(pd.DataFrame({"image": [*images, "garbage"]}), {"k": 2})
            ok = answer[answer["error"].isna()]
            assert ok.groupby("query")["predicted_category"].first().tolist() == ["cats", "dogs"]
            assert ok.groupby("query")["predicted_item_name"].first().tolist() == [
                "thing 0",
                "thing 2",
            ]
            probs = ok["predicted_category_probability"].astype(float)
            assert ((probs > 0) & (probs <= 1)).all()
            bad = answer[answer["error"].notna()]
            assert len(bad) == 1 and bad["predicted_category"].isna().all()
            text = served.predict(pd.DataFrame({"text": ["cat"]}), {"k": 2})
            assert "predicted_category" not in text.columns

            # a tampered head file is refused before skops reads it
            head = next((local / "artifacts" / "attributes").glob("*.skops"))
            head.write_bytes(head.read_bytes() + b"\0")
            with pytest.raises(ArtifactIntegrityError, match="attributes"):
                mlflow.pyfunc.load_model(str(local))

            client.set_model_version_tag(ATTRIBUTES_MODEL, version, TAG_EXTRACTOR_VERSION, "99")
            local, files = _copy(tmp_path / "other")
            (line,) = sr.prepare_copy(local, files, reranker_alias=None, client=client)
            assert "not used" in line and "extractor v99" in line
            assert (
                "predicted_category"
                not in mlflow.pyfunc.load_model(str(local))
                .predict(pd.DataFrame({"image": images[:1]}), {"k": 2})
                .columns
            )
        finally:  # the search env is shared by the session's other tests
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                client.delete_registered_model(ATTRIBUTES_MODEL)


def test_served_attributes_reuse_the_query_images_decoded_for_the_embedding(
    env: SearchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With bundled heads, each query image is decoded once per request (not again for the
    heads), and the answer is the one the heads give on a fresh decode of the same images."""
    from registry.attributes_model import ATTRIBUTES_MODEL
    from tests.test_search_cli import _register_heads

    with tracking(env.uri):
        client = MlflowClient()
        try:
            _register_heads(env, tmp_path)
            local, files = _copy(tmp_path)
            sr.prepare_copy(local, files, reranker_alias=None, client=client)
            served = mlflow.pyfunc.load_model(str(local))
        finally:  # the search env is shared by the session's other tests
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                client.delete_registered_model(ATTRIBUTES_MODEL)
    model = served.unwrap_python_model()
    assert model.attributes is not None
    # the modules the loaded copy runs (MLflow may import them afresh from the copy's code/)
    models_mod = sys.modules[type(model).__module__]
    decoding = sys.modules[models_mod.decode_images.__module__]
    decoded: list[object] = []
    real_open = decoding.open_rgb

    def counting_open(*args: object, **kwargs: object) -> object:
        decoded.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(decoding, "open_rgb", counting_open)
    images = [base64.b64encode(env.images[i]).decode() for i in (0, 4)]
    frame = pd.DataFrame({"image": [*images, "garbage"]})
    answer = served.predict(frame, {"k": 2})
    assert len(decoded) == 2  # the two good images, once each ("garbage" fails before decoding)
    assert answer["predicted_category"].notna().sum() == 4

    # the same answer as heads run on their own decode of the images
    heads, model.attributes = model.attributes, None
    try:
        plain = served.predict(frame, {"k": 2})
    finally:
        model.attributes = heads
    fresh, _ = decoding.decode_images(
        list(frame["image"]), allow_paths=model.allow_paths, limits=model.limits
    )
    expected = decoding._jsonable(heads.annotate(plain, fresh))
    pd.testing.assert_frame_equal(answer, expected)


def test_bundled_artifact_reads_the_path_and_version_from_the_pyfunc_context() -> None:
    """One reader for every bundled artifact (reranker, attribute heads): its path, and its
    version from the model config (None when missing or empty); None without the artifact."""
    from types import SimpleNamespace

    ctx = SimpleNamespace(
        artifacts={"reranker": "/copy/artifacts/reranker", "attributes": "/copy/a"},
        model_config={sr.VERSION_KEY: 3, "attributes_version": ""},
    )
    assert sr.bundled_artifact(ctx, "reranker", sr.VERSION_KEY) == (
        Path("/copy/artifacts/reranker"),
        "3",
    )
    assert sr.bundled_artifact(ctx, "attributes", "attributes_version") == (Path("/copy/a"), None)
    assert sr.bundled_artifact(ctx, "text", "text_version") is None
    assert sr.bundled_artifact(SimpleNamespace(), "reranker", sr.VERSION_KEY) is None
    assert sr.ServedReranker.from_context(SimpleNamespace(artifacts={})) is None
